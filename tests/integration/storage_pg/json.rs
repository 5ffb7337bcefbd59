//! Lossless JSON (G16): whatever goes in comes back equal, through `jsonb`.

use hephaestus_engine_core::ports::{
    InstanceStore, NewStepResult, PortError, ResultPayload, StepResultStore, UnitOfWork,
};
use hephaestus_engine_core::step::{EventName, StepError};
use hephaestus_storage_pg::PgStore;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Number, Value, json};

use super::{Db, pending, sid};

/// Stores `value` in every JSON place of an instance and of a step result, reads both
/// back, and returns them.
async fn round_trip(store: &PgStore, value: &Value) -> Result<(), String> {
    let mut inst = pending("order::1");
    inst.business_id = super::bid(&format!("order::{}", inst.id.simple()));
    inst.unique_claim = None;
    inst.context = hephaestus_engine_core::Context::new(value.clone());
    inst.context.put_step_output("a", value.clone());
    inst.step_configs.insert(sid("a"), value.clone());
    inst.runtime_metadata.insert("v".to_owned(), value.clone());
    inst.telemetry_metadata
        .insert("v".to_owned(), value.clone());
    if let Value::Object(map) = value {
        inst.runtime_metadata.extend(map.clone());
    }
    let mut metadata = Map::new();
    metadata.insert("v".to_owned(), value.clone());
    let result = NewStepResult {
        instance_id: inst.id,
        step: Some(sid("a")),
        activation: 1,
        payload: ResultPayload::Completed {
            event: EventName("done".to_owned()),
            output: value.clone(),
            metadata,
        },
    };
    let failure = NewStepResult {
        instance_id: inst.id,
        step: Some(sid("b")),
        activation: 1,
        payload: ResultPayload::Failed {
            // Wrapped: `details: Some(null)` reads back as `None` (engine-core's serde
            // form of `StepError`, in memory as well as in any store).
            error: StepError::fatal("x").with_details(json!({ "v": value })),
            attempts: Vec::new(),
        },
    };

    let mut tx = store.begin().await.map_err(|e| e.to_string())?;
    store
        .insert(&mut tx, &inst)
        .await
        .map_err(|e| e.to_string())?;
    for r in [&result, &failure] {
        store.record(&mut tx, r).await.map_err(|e| e.to_string())?;
    }
    store.commit(tx).await.map_err(|e| e.to_string())?;

    let got = store.get(inst.id).await.map_err(|e| e.to_string())?;
    if got.as_ref() != Some(&inst) {
        return Err(format!("instance differs:\n got {got:?}\nwant {inst:?}"));
    }
    let mut tx = store.begin().await.map_err(|e| e.to_string())?;
    let rows = store
        .pending(&mut tx, inst.id)
        .await
        .map_err(|e| e.to_string())?;
    let rows: Vec<NewStepResult> = rows.into_iter().map(|r| r.result).collect();
    if rows != [result.clone(), failure.clone()] {
        return Err(format!("results differ:\n got {rows:?}\nwant {result:?}"));
    }
    Ok(())
}

/// Text without U+0000 (which PostgreSQL cannot store; rejected, tested elsewhere).
fn text() -> impl Strategy<Value = String> {
    any::<String>().prop_map(|s| s.replace('\0', "\u{fffd}"))
}

fn json_value() -> impl Strategy<Value = Value> {
    let number = prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter_map("finite", Number::from_f64)
            .prop_map(Value::Number),
        // Integral floats, the ones `jsonb` would turn into integers if written as `1e+16`.
        (-20_i32..=20, any::<bool>()).prop_map(|(exp, neg)| {
            let f = 10_f64.powi(exp) * if neg { -1.0 } else { 1.0 };
            Value::Number(Number::from_f64(f).unwrap())
        }),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number,
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn arbitrary_json_round_trips_exactly() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let db = runtime.block_on(Db::new());
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let outcome = runner.run(&json_value(), |value| {
        runtime
            .block_on(round_trip(&db.store, &value))
            .map_err(TestCaseError::fail)
    });
    runtime.block_on(db.teardown());
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

#[tokio::test]
async fn awkward_json_round_trips_exactly() {
    let db = Db::new().await;
    let values = [
        json!({
            "unicode": "héllo wörld ✓ 日本語 😀 \u{200b} \u{2028} ∑ \u{1} \u{1f} \u{7f}",
            "escapes": "quote \" backslash \\ newline \n tab \t slash / \\u0000 (text)",
            "ключ": "значение",
            "": "empty key",
            "big": {"u64_max": u64::MAX, "i64_min": i64::MIN, "i64_max": i64::MAX, "zero": 0},
            "floats": [0.1, -2.5, 3.0, 1e15, 1e16, -1e17, 1e19, 1e20, 1e21, 1e300, f64::MAX,
                       f64::MIN_POSITIVE, 5e-324, 1e-7, 123_456.789, 9_007_199_254_740_993.0],
            "nulls": [null, {"inner": null}],
            "empty_object": {},
            "empty_array": [],
            "empty_string": "",
            "bools": [true, false],
            "nested": {"a": {"b": {"c": [1, [2, [3, {"d": true}]]]}}},
        }),
        json!(null),
        json!(1e16),
        json!("top-level string"),
        (0..100).fold(json!([]), |inner, _| json!([inner])),
    ];
    for value in &values {
        round_trip(&db.store, value).await.unwrap();
    }
    // Integral floats stay floats, integers stay integers.
    let inst = pending("order::2");
    let mut inst = inst;
    inst.context = hephaestus_engine_core::Context::new(json!([1e16, 10_000_000_000_000_000_u64]));
    super::insert_committed(&db.store, &inst).await;
    let back = db.store.get(inst.id).await.unwrap().unwrap();
    assert!(back.context.initial[0].is_f64() && back.context.initial[1].is_u64());
    db.teardown().await;
}

#[tokio::test]
async fn nul_is_rejected_before_anything_is_sent() {
    let db = Db::new().await;
    let inst = pending("order::1");
    super::insert_committed(&db.store, &inst).await;
    let bad = [
        ResultPayload::Completed {
            event: EventName("do\u{0}ne".to_owned()),
            output: json!(1),
            metadata: Map::new(),
        },
        ResultPayload::Completed {
            event: EventName("done".to_owned()),
            output: json!(1),
            metadata: [("k\u{0}".to_owned(), json!(1))].into_iter().collect(),
        },
        ResultPayload::Failed {
            error: StepError::fatal("bo\u{0}om"),
            attempts: Vec::new(),
        },
        ResultPayload::Cancel {
            reason: Some("\u{0}".to_owned()),
        },
    ];
    let mut tx = db.store.begin().await.unwrap();
    for payload in bad {
        let outcome = db
            .store
            .record(
                &mut tx,
                &NewStepResult {
                    instance_id: inst.id,
                    step: Some(sid("a")),
                    activation: 1,
                    payload,
                },
            )
            .await;
        assert!(
            matches!(outcome, Err(PortError::InvalidInput(_))),
            "{outcome:?}"
        );
    }
    // Nothing was sent: the transaction is intact.
    db.store.commit(tx).await.unwrap();
    db.teardown().await;
}
