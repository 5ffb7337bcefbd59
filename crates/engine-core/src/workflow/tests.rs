//! Definition tests: every validation rule, with the original's phrases.

use std::collections::BTreeMap;

use serde_json::json;

use super::*;
use crate::step::StepOutcome;
use crate::steps::{Done, FnStep, Wait, WaitForEvent};

fn step(id: &str, events: &[&str]) -> FnStep {
    let first = events.first().copied().unwrap_or("done").to_owned();
    FnStep::new(id, events.iter().copied(), move |_| {
        StepOutcome::complete(&first)
    })
}

fn base(id: &str) -> WorkflowBuilder {
    Workflow::builder(id).unique("order", Scope::Workflow)
}

fn errors(b: WorkflowBuilder) -> Vec<WorkflowError> {
    match b.build() {
        Ok(wf) => panic!("expected errors, built {wf:?}"),
        Err(e) => e.errors,
    }
}

fn messages(b: WorkflowBuilder) -> String {
    errors(b)
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_linear_workflow_builds_with_its_graph() {
    let a = step("StepA", &["done"]);
    let b = step("StepB", &["done"]);
    let wf = base("linear")
        .version(3)
        .tags(["billing"])
        .metadata(json!({"team": "payments"}))
        .start(a.clone())
        .on(a, "done", b.clone())
        .on(b, "done", Done)
        .build()
        .unwrap();
    assert_eq!(wf.id().as_str(), "linear");
    assert_eq!(wf.version(), 3);
    assert_eq!(wf.tags(), ["billing"]);
    assert_eq!(wf.metadata()["team"], "payments");
    assert_eq!(wf.start().step.as_str(), "StepA");
    assert_eq!(wf.step("StepA").unwrap().key, "step_a");
    let preds: Vec<String> = wf
        .predecessors("StepB")
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(preds, ["StepA"]);
    assert!(wf.predecessors("StepA").is_empty());
    assert_eq!(wf.edges().len(), 2);
    assert!(wf.transition("StepA", "done").is_some());
    assert!(wf.transition("StepA", "other").is_none());
}

#[test]
fn steps_can_be_referenced_by_id() {
    let a = step("a", &["done"]);
    let wf = base("by_id")
        .step(a)
        .start("a")
        .on("a", "done", Done)
        .build()
        .unwrap();
    assert_eq!(wf.start().step.as_str(), "a");
}

#[test]
fn o1_tags_must_be_nonempty_strings() {
    let a = step("a", &["done"]);
    let msg = messages(
        base("w")
            .tags(["ok", ""])
            .start(a.clone())
            .on(a, "done", Done),
    );
    assert!(
        msg.contains("expected :tags to be a list of strings"),
        "{msg}"
    );
}

#[test]
fn o2_o3_o4_metadata_must_be_a_json_object_with_string_keys_and_safe_values() {
    let a = step("a", &["done"]);
    let wf = |m: WorkflowBuilder| m.start(a.clone()).on(a.clone(), "done", Done);
    let msg = messages(wf(base("w").metadata(json!([1, 2]))));
    assert!(msg.contains("expected :metadata to be a map"), "{msg}");
    let mut bad_keys: BTreeMap<Vec<u8>, u8> = BTreeMap::new();
    bad_keys.insert(vec![1], 1);
    let msg = messages(wf(base("w").metadata(bad_keys)));
    assert!(
        msg.contains("expected :metadata keys to be strings"),
        "{msg}"
    );
    let msg = messages(wf(base("w").metadata(json!({"k": "nul\u{0}"}))));
    assert!(
        msg.contains("expected :metadata values to be JSON-safe"),
        "{msg}"
    );
}

#[test]
fn o5_unique_is_required_and_validated() {
    let a = step("a", &["done"]);
    let msg = messages(
        Workflow::builder("w")
            .start(a.clone())
            .on(a.clone(), "done", Done),
    );
    assert!(msg.contains("the :unique option is required"), "{msg}");
    let msg = messages(
        Workflow::builder("w")
            .unique("Bad-Key", Scope::Global)
            .start(a.clone())
            .on(a, "done", Done),
    );
    assert!(
        msg.contains("unique key must contain only lowercase letters and numbers"),
        "{msg}"
    );
}

#[test]
fn o6_version_must_be_positive() {
    let a = step("a", &["done"]);
    let msg = messages(base("w").version(0).start(a.clone()).on(a, "done", Done));
    assert!(
        msg.contains("version: must be a positive integer, got: 0"),
        "{msg}"
    );
}

#[test]
fn invalid_workflow_id_and_retry_policy() {
    let a = step("a", &["done"]);
    let policy = RetryPolicy {
        max_attempts: 0,
        ..RetryPolicy::default()
    };
    let errs = errors(
        Workflow::builder("bad id")
            .unique("k", Scope::None)
            .retry_policy(policy)
            .start(a.clone())
            .on(a, "done", Done),
    );
    assert!(
        matches!(errs[0], WorkflowError::InvalidWorkflowId(_)),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| matches!(e, WorkflowError::InvalidRetryPolicy(_)))
    );
}

#[test]
fn s1_exactly_one_start() {
    let a = step("a", &["done"]);
    let msg = messages(base("w").on(a, "done", Done));
    assert!(msg.contains("workflow must define start/0"), "{msg}");
    let a = step("a", &["done"]);
    let errs = errors(
        base("w")
            .start(a.clone())
            .start(a.clone())
            .on(a, "done", Done),
    );
    assert_eq!(errs, vec![WorkflowError::DuplicateStart(2)]);
}

#[test]
fn s2_transition_shapes() {
    let a = step("a", &["done", "other"]);
    let msg = messages(
        base("w")
            .start(a.clone())
            .on(a.clone(), "not an event", Done)
            .on(a.clone(), "done", Done)
            .on(a.clone(), "done", Done)
            .fan_out(a.clone(), "other", []),
    );
    assert!(
        msg.contains("transit/3 event must be an atom event"),
        "{msg}"
    );
    assert!(
        msg.contains("duplicate transition from a on :done"),
        "{msg}"
    );
    assert!(
        msg.contains("transit/3 body must return step modules"),
        "{msg}"
    );

    let msg = messages(
        base("w")
            .start(a.clone())
            .route(a.clone(), "done", [], |_| vec![])
            .on(a.clone(), "other", Done),
    );
    assert!(
        msg.contains("@targets must be a list of step modules"),
        "{msg}"
    );

    let b = step("b", &["done"]);
    let msg = messages(
        base("w")
            .start(a.clone())
            .fan_out(a.clone(), "done", [target(b.clone()), target(b.clone())])
            .on(a, "other", Done)
            .on(b, "done", Done),
    );
    assert!(msg.contains("lists b more than once"), "{msg}");
}

#[test]
fn two_step_types_cannot_share_an_id() {
    #[derive(Debug)]
    struct Other;
    #[async_trait::async_trait]
    impl Step for Other {
        fn id(&self) -> StepId {
            StepId::new("a").unwrap()
        }
        fn events(&self, _: Option<&Value>) -> Vec<Event> {
            vec![Event::new("done").unwrap()]
        }
        async fn execute(&self, _: crate::step::StepInput<'_>) -> StepOutcome {
            StepOutcome::complete("done")
        }
    }
    let a = step("a", &["done"]);
    let errs = errors(base("w").start(a.clone()).on(a, "done", Done).step(Other));
    assert!(
        errs.contains(&WorkflowError::DuplicateStepId(StepId::new("a").unwrap())),
        "{errs:?}"
    );
}

#[test]
fn g1_cycles_are_rejected_and_named() {
    let a = step("a", &["next"]);
    let b = step("b", &["back", "done"]);
    let errs = errors(
        base("w")
            .start(a.clone())
            .on(a.clone(), "next", b.clone())
            .on(b.clone(), "back", a)
            .on(b, "done", Done),
    );
    let msg = errs.iter().map(ToString::to_string).collect::<String>();
    assert!(msg.contains("cycle detected in workflow graph"), "{msg}");
    assert!(msg.contains("a -> b -> a"), "{msg}");

    let selfloop = step("s", &["again", "done"]);
    let msg = messages(
        base("w")
            .start(selfloop.clone())
            .on(selfloop.clone(), "again", selfloop.clone())
            .on(selfloop, "done", Done),
    );
    assert!(
        msg.contains("cycle detected in workflow graph: s -> s"),
        "{msg}"
    );
}

#[test]
fn g2_every_step_is_reachable_from_the_start() {
    let a = step("a", &["done"]);
    let orphan = step("orphan", &["done"]);
    let lonely = step("lonely", &["done"]);
    let msg = messages(
        base("w")
            .start(a.clone())
            .on(a, "done", Done)
            .on(orphan, "done", Done)
            .step(lonely),
    );
    assert!(
        msg.contains("unreachable steps from start/0 a: lonely, orphan"),
        "{msg}"
    );
}

#[test]
fn g3_every_path_ends_at_done() {
    let a = step("a", &["done"]);
    let b = step("b", &["done"]);
    let msg = messages(base("w").start(a.clone()).on(a, "done", b));
    assert!(
        msg.contains("path terminates at b, which is not Hephaestus.Steps.Done"),
        "{msg}"
    );
}

#[test]
fn g4_static_fan_outs_must_converge_before_done() {
    let a = step("a", &["done"]);
    let b = step("b", &["done"]);
    let c = step("c", &["done"]);
    let msg = messages(
        base("w")
            .start(a.clone())
            .fan_out(a.clone(), "done", [target(b.clone()), target(c.clone())])
            .on(b.clone(), "done", Done)
            .on(c.clone(), "done", Done),
    );
    assert!(
        msg.contains("fan-out branches from a must converge before Hephaestus.Steps.Done"),
        "{msg}"
    );

    let join = step("join", &["done"]);
    base("w")
        .start(a.clone())
        .fan_out(a.clone(), "done", [target(b.clone()), target(c.clone())])
        .on(b.clone(), "done", join.clone())
        .on(c.clone(), "done", join.clone())
        .on(join, "done", Done)
        .build()
        .unwrap();

    // Dynamic routes are not checked for convergence.
    base("w")
        .start(a.clone())
        .route(a, "done", [target(b.clone()), target(c.clone())], |_| {
            vec![Pick::step("b")]
        })
        .on(b, "done", Done)
        .on(c, "done", Done)
        .build()
        .unwrap();
}

#[test]
fn g5_context_keys_are_unique() {
    let a = step("a", &["done"]);
    let b = step("b", &["done"]).with_key("shared");
    let c = step("c", &["done"]).with_key("shared");
    let join = step("join", &["done"]);
    let msg = messages(
        base("w")
            .start(a.clone())
            .fan_out(a, "done", [target(b.clone()), target(c.clone())])
            .on(b, "done", join.clone())
            .on(c, "done", join.clone())
            .on(join, "done", Done),
    );
    assert!(
        msg.contains("context key collision for :shared: b, c"),
        "{msg}"
    );

    let fake = step("fake", &["done"]).with_key("done");
    let msg = messages(base("w").start(fake.clone()).on(fake, "done", Done));
    assert!(msg.contains("context key collision for :done"), "{msg}");
}

#[test]
fn g6a_unknown_step_ids_are_reported() {
    let a = step("a", &["done"]);
    let msg = messages(base("w").start(a.clone()).on(a, "done", "ghost"));
    assert!(msg.contains("unable to load step module ghost"), "{msg}");
    let msg = messages(base("w").start("bad id").on("bad id", "done", Done));
    assert!(
        msg.contains("transit/3 source must be a step module"),
        "{msg}"
    );
}

#[test]
fn g6b_g6c_steps_declare_events_once() {
    let silent = step("silent", &[]);
    let msg = messages(base("w").start(silent.clone()).on(silent, "done", Done));
    assert!(msg.contains("silent must implement events/0"), "{msg}");
    let twice = step("twice", &["done", "done"]);
    let msg = messages(base("w").start(twice.clone()).on(twice, "done", Done));
    assert!(
        msg.contains("events/0 must return a list of atoms without duplicates"),
        "{msg}"
    );
}

#[test]
fn g6d_transitions_use_declared_events() {
    let a = step("a", &["done"]);
    let msg = messages(
        base("w")
            .start(a.clone())
            .on(a.clone(), "done", Done)
            .on(a, "nope", Done),
    );
    assert!(
        msg.contains("a does not declare :nope in events/0"),
        "{msg}"
    );
}

#[test]
fn g6e_every_declared_event_has_a_transition() {
    let a = step("a", &["ok", "ko"]);
    let msg = messages(base("wf").start(a.clone()).on(a, "ok", Done));
    assert!(
        msg.contains("a declares event :ko but no transit is defined in wf"),
        "{msg}"
    );

    // Built-in steps too: Wait needs a `timeout` transition.
    let msg = messages(base("wf").start_with(Wait, json!({"duration": 1, "unit": "second"})));
    assert!(
        msg.contains("hephaestus::Wait declares event :timeout but no transit"),
        "{msg}"
    );

    // WaitForEvent declares `timeout` only when configured with a timeout.
    base("wf")
        .start(WaitForEvent)
        .on(WaitForEvent, "received", Done)
        .build()
        .unwrap();
    let msg = messages(
        base("wf")
            .start_with(WaitForEvent, json!({"timeout_ms": 1000}))
            .on(WaitForEvent, "received", Done),
    );
    assert!(
        msg.contains("declares event :timeout but no transit"),
        "{msg}"
    );
    base("wf")
        .start_with(WaitForEvent, json!({"timeout_ms": 1000}))
        .on(WaitForEvent, "received", Done)
        .on(WaitForEvent, "timeout", Done)
        .build()
        .unwrap();
}

#[test]
fn literal_wait_configs_are_checked_at_build_time() {
    let msg = messages(
        base("wf")
            .start_with(Wait, json!({"duration": "soon"}))
            .on(Wait, "timeout", Done),
    );
    assert!(msg.contains("invalid config for hephaestus::Wait"), "{msg}");
    for bad in [
        json!({"duration": 0}),
        json!({"duration": -3, "unit": "second"}),
        json!({"duration": 5, "unit": "fortnight"}),
    ] {
        let msg = messages(
            base("wf")
                .start_with(Wait, bad.clone())
                .on(Wait, "timeout", Done),
        );
        assert!(
            msg.contains("invalid config for hephaestus::Wait"),
            "{bad}: {msg}"
        );
    }
    let msg = messages(
        base("wf")
            .start_with(WaitForEvent, json!({"timeout_ms": 0}))
            .on(WaitForEvent, "received", Done)
            .on(WaitForEvent, "timeout", Done),
    );
    assert!(
        msg.contains("invalid config for hephaestus::WaitForEvent"),
        "{msg}"
    );
}

#[test]
fn literal_configs_too_deep_to_store_are_refused_at_build_time() {
    let msg = messages(
        base("wf")
            .start_with(
                WaitForEvent,
                json!({"timeout_ms": 5, "x": crate::limits::nested(crate::limits::MAX_DEPTH)}),
            )
            .on(WaitForEvent, "received", Done)
            .on(WaitForEvent, "timeout", Done),
    );
    assert!(msg.contains("nested deeper than 64"), "{msg}");
    let msg = messages(base("wf").metadata(json!({"m": crate::limits::nested(64)})));
    assert!(
        msg.contains("expected :metadata values to be JSON-safe"),
        "{msg}"
    );
}

#[test]
fn all_problems_are_reported_options_first() {
    let a = step("a", &["ok", "ko"]);
    let b = step("b", &["done"]);
    let errs = errors(
        Workflow::builder("w")
            .version(0)
            .start(a.clone())
            .on(a.clone(), "ok", b.clone())
            .on(b.clone(), "done", a)
            .step(step("lost", &["done"])),
    );
    let ranks: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert!(errs.len() >= 5, "{ranks:#?}");
    assert!(matches!(
        errs[0],
        WorkflowError::MissingUnique | WorkflowError::InvalidVersion(_)
    ));
    assert!(matches!(
        errs[1],
        WorkflowError::MissingUnique | WorkflowError::InvalidVersion(_)
    ));
    assert!(errs.iter().any(|e| matches!(e, WorkflowError::Cycle(_))));
    assert!(
        errs.iter()
            .any(|e| matches!(e, WorkflowError::Unreachable { .. }))
    );
    assert!(
        errs.iter()
            .any(|e| matches!(e, WorkflowError::MissingTransition { .. }))
    );
    let pos = |f: fn(&WorkflowError) -> bool| errs.iter().position(f).unwrap();
    assert!(
        pos(|e| matches!(e, WorkflowError::Cycle(_)))
            < pos(|e| matches!(e, WorkflowError::Unreachable { .. }))
    );
    let display = Workflow::builder("w").build().unwrap_err().to_string();
    assert!(display.starts_with("invalid workflow w: "), "{display}");
}

fn versioned(version: u32, key: &str) -> Workflow {
    let a = step("a", &["done"]);
    Workflow::builder("signup")
        .version(version)
        .unique(key, Scope::Version)
        .start(a.clone())
        .on(a, "done", Done)
        .build()
        .unwrap()
}

#[test]
fn families_resolve_requested_selected_or_current() {
    let family = WorkflowFamily::builder("signup")
        .version(versioned(1, "user"))
        .version(versioned(2, "user"))
        .current(1)
        .selector(|sel| (sel.business_value == "beta").then_some(2))
        .build()
        .unwrap();
    let input = json!({});
    let meta = Map::new();
    let sel = |v: &'static str| StartSelection {
        business_value: v,
        input: &input,
        metadata: &meta,
    };
    assert_eq!(family.resolve(None, &sel("x")).unwrap().version(), 1);
    assert_eq!(family.resolve(None, &sel("beta")).unwrap().version(), 2);
    assert_eq!(family.resolve(Some(2), &sel("x")).unwrap().version(), 2);
    let err = family.resolve(Some(7), &sel("x")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "version 7 not found for signup. Available: [1, 2]"
    );
    assert_eq!(family.current_version(), 1);
    assert_eq!(family.unique().key.as_str(), "user");

    // Without `current`, the highest version is current.
    let family = WorkflowFamily::builder("signup")
        .version(versioned(2, "user"))
        .version(versioned(1, "user"))
        .build()
        .unwrap();
    assert_eq!(family.current_version(), 2);
}

#[test]
fn family_rules() {
    let msg = |r: Result<WorkflowFamily, WorkflowErrors>| r.unwrap_err().to_string();
    assert!(msg(WorkflowFamily::builder("signup").build()).contains("has no versions"));
    assert!(
        msg(WorkflowFamily::builder("signup")
            .version(versioned(1, "user"))
            .current(3)
            .build())
        .contains(":current 3 is not a key in :versions (available: [1])")
    );
    assert!(
        msg(WorkflowFamily::builder("signup")
            .version_as(2, versioned(1, "user"))
            .build())
        .contains("version mismatch for signup: __version__/0 returns 1 but key is 2")
    );
    assert!(
        msg(WorkflowFamily::builder("signup")
            .version_as(0, versioned(1, "user"))
            .build())
        .contains("all keys in :versions must be positive integer")
    );
    assert!(
        msg(WorkflowFamily::builder("other")
            .version(versioned(1, "user"))
            .build())
        .contains("must be nested under other")
    );
    assert!(
        msg(WorkflowFamily::builder("signup")
            .version(versioned(1, "user"))
            .version(versioned(1, "user"))
            .build())
        .contains("version 1 is declared twice")
    );
    assert!(
        msg(WorkflowFamily::builder("signup")
            .version(versioned(1, "user"))
            .version(versioned(2, "account"))
            .build())
        .contains("must share the family's unique key")
    );
}

#[test]
fn standalone_version_resolution_and_registry() {
    let wf = versioned(1, "user");
    assert_eq!(wf.resolve_version(None), Ok(1));
    assert_eq!(wf.resolve_version(Some(1)), Ok(1));
    assert_eq!(
        wf.resolve_version(Some(2)).unwrap_err().to_string(),
        "signup is not a versioned workflow; it only supports version 1, got: 2"
    );
    let mut registry = WorkflowRegistry::new();
    registry.register(wf.clone()).unwrap();
    assert_eq!(
        registry.register(wf),
        Err(RegistryError::DuplicateWorkflow("signup".into()))
    );
    assert_eq!(registry.get("signup", 1).unwrap().version(), 1);
    assert!(matches!(
        registry.get("signup", 2),
        Err(RegistryError::UnknownVersion { .. })
    ));
    assert_eq!(
        registry.get("nope", 1).unwrap_err(),
        RegistryError::UnknownWorkflow("nope".into())
    );
    assert_eq!(registry.families().count(), 1);
}

#[test]
fn retry_policy_resolves_step_then_workflow_then_default() {
    let own = RetryPolicy::no_retries();
    let wf_policy = RetryPolicy::new(
        3,
        crate::retry::Backoff::Linear,
        std::time::Duration::from_millis(10),
        std::time::Duration::from_secs(1),
    )
    .unwrap();
    let a = step("a", &["done"]).with_retry_policy(own);
    let b = step("b", &["done"]);
    let with_default = base("w")
        .retry_policy(wf_policy)
        .start(a.clone())
        .on(a.clone(), "done", b.clone())
        .on(b.clone(), "done", Done)
        .build()
        .unwrap();
    assert_eq!(with_default.retry_policy_for("a"), own);
    assert_eq!(with_default.retry_policy_for("b"), wf_policy);
    let plain = base("w")
        .start(a.clone())
        .on(a, "done", b.clone())
        .on(b, "done", Done)
        .build()
        .unwrap();
    assert_eq!(plain.retry_policy_for("b"), RetryPolicy::default());
}

#[test]
fn edges_record_dynamic_routes_and_successors() {
    let a = step("a", &["done"]);
    let b = step("b", &["done"]);
    let c = step("c", &["done"]);
    let wf = base("w")
        .start(a.clone())
        .route(a, "done", [target(b.clone()), target(c.clone())], |_| {
            vec![Pick::step("b")]
        })
        .on(b, "done", Done)
        .on(c, "done", Done)
        .build()
        .unwrap();
    let edges = wf.edges();
    assert_eq!(edges.iter().filter(|e| e.dynamic).count(), 2);
    let succ: Vec<&str> = wf.successors("a").map(StepId::as_str).collect();
    assert_eq!(succ, ["b", "c"]);
    assert_eq!(wf.predecessors(crate::steps::DONE_ID).len(), 2);
    assert!(wf.transition("a", "done").unwrap().is_dynamic());
    assert_eq!(wf.transitions().count(), 3);
}
