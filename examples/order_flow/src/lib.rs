//! The order-flow demo as a library: the `orders::Checkout` workflow and the
//! scripted run that drives two orders through it, shared by this example's
//! binary (`cargo run -p order-flow`, in memory or on PostgreSQL) and by
//! `hephaestus demo`.
//!
//! `validate` branches on the order; a valid one fans out to `charge_card`
//! and `reserve_stock`, which join at `pack`; a dynamic route picks `freight`
//! or `courier` by weight; `await_delivery` waits for a delivery event (with a
//! timeout timer), and `cool_off` is a durable one-second `Wait`.

use std::time::Duration;

use anyhow::{Context, Result};
use hephaestus_engine_core::prelude::*;
use hephaestus_engine_core::steps::{Done, FnStep, Wait, WaitForEvent};
use hephaestus_memory::MemoryBackend;
use hephaestus_runner::telemetry::names;
use hephaestus_runner::{RunnerConfig, Runtime};
use serde_json::json;

/// The `orders::Checkout` workflow.
pub fn checkout() -> Result<Workflow> {
    let validate = FnStep::new("orders::Validate", ["valid", "invalid"], |input| {
        let total = input.context.initial["total"].as_u64().unwrap_or(0);
        if total > 0 {
            StepOutcome::complete_with("valid", json!({ "total": total }))
        } else {
            StepOutcome::complete_with("invalid", json!({ "reason": "empty order" }))
        }
    });
    let charge = FnStep::new("orders::ChargeCard", ["charged"], |input| {
        // The idempotency key is stable across retries: pass it to the payment API.
        StepOutcome::complete_with(
            "charged",
            json!({ "payment_ref": input.idempotency_key.to_string() }),
        )
    });
    let reserve = FnStep::new("orders::ReserveStock", ["reserved"], |_| {
        StepOutcome::complete_with("reserved", json!({ "warehouse": "lisbon" }))
    });
    let pack = FnStep::new("orders::Pack", ["packed"], |input| {
        let heavy = input.context.initial["weight_kg"].as_u64().unwrap_or(0) > 20;
        StepOutcome::complete_with("packed", json!({ "heavy": heavy }))
    });
    let freight = FnStep::new("orders::Freight", ["booked"], |_| {
        StepOutcome::complete("booked")
    });
    let courier = FnStep::new("orders::Courier", ["booked"], |_| {
        StepOutcome::complete("booked")
    });
    let reject = FnStep::new("orders::Reject", ["done"], |_| {
        StepOutcome::complete("done")
    });
    Ok(Workflow::builder("orders::Checkout")
        .unique("order", Scope::Workflow)
        .start(validate.clone())
        .fan_out(
            validate.clone(),
            "valid",
            [target(charge.clone()), target(reserve.clone())],
        )
        .on(validate, "invalid", reject.clone())
        .on(reject, "done", Done)
        .on(charge, "charged", pack.clone())
        .on(reserve, "reserved", pack.clone())
        .route(
            pack,
            "packed",
            [target(freight.clone()), target(courier.clone())],
            |ctx| {
                let heavy = ctx
                    .step("pack")
                    .and_then(|o| o["heavy"].as_bool())
                    .unwrap_or(false);
                vec![Pick::step(if heavy {
                    "orders::Freight"
                } else {
                    "orders::Courier"
                })]
            },
        )
        .on_with(
            freight,
            "booked",
            WaitForEvent,
            json!({ "timeout_ms": 60_000 }),
        )
        .on_with(
            courier,
            "booked",
            WaitForEvent,
            json!({ "timeout_ms": 60_000 }),
        )
        .on_with(
            WaitForEvent,
            "received",
            Wait,
            json!({ "duration": 1, "unit": "second" }),
        )
        .on(WaitForEvent, "timeout", Done)
        .on(Wait, "timeout", Done)
        .build()?)
}

/// The runner configuration of the demo: a short poll interval, so the
/// in-memory worker loop picks due timers up quickly.
pub fn config() -> RunnerConfig {
    RunnerConfig::default().with_poll_interval(Duration::from_millis(20))
}

/// Runs the demo on the in-memory backend (no database): the runtime's own
/// worker loop runs the jobs while [`demo`] drives two orders to their end.
pub async fn run_in_memory() -> Result<()> {
    let runtime = Runtime::builder(MemoryBackend::new())
        .discard_handler(hephaestus_failure_handler::FailureHandler::new())
        .config(config())
        .workflow(checkout()?)
        .build()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = {
        let rt = runtime.clone();
        tokio::spawn(async move {
            rt.run(async {
                stopped.await.ok();
            })
            .await
        })
    };
    let outcome = demo("", &runtime).await;
    stop.send(()).ok();
    worker.await??;
    outcome
}

/// Starts two orders (`1001<suffix>`, valid, and `1002<suffix>`, empty),
/// resumes the valid one's delivery wait when it is reached, prints every
/// step as it runs and, once both ended, each instance's status, context and
/// step states. Workers must be running on `runtime`'s backend.
pub async fn demo<B: hephaestus_runner::Backend>(suffix: &str, runtime: &Runtime<B>) -> Result<()> {
    let (first, second) = (format!("1001{suffix}"), format!("1002{suffix}"));
    let mut events = runtime.subscribe();

    let orders = runtime.workflow("orders::Checkout")?;
    let started = orders
        .start(&first, json!({ "total": 42, "weight_kg": 3 }))
        .await?;
    let rejected = orders.start(&second, json!({ "total": 0 })).await?;
    println!(
        "started {} ({}) and {} ({})",
        started.business_id, started.id, rejected.business_id, rejected.id
    );

    let mut resumed = false;
    let mut finished = 0;
    while finished < 2 {
        let event = tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .context("the demo stalled")??;
        let instance = event
            .metadata
            .get("business_id")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        match event.name {
            names::STEP_STOP => println!(
                "  [{instance}] ran {} -> :{}",
                field(&event, "step"),
                field(&event, "event")
            ),
            names::STEP_ASYNC => {
                println!("  [{instance}] {} waits", field(&event, "step"));
                if !resumed && field(&event, "step") == "hephaestus::WaitForEvent" {
                    resumed = true;
                    println!("  [{instance}] the courier confirms delivery");
                    orders
                        .resume(
                            &first,
                            "hephaestus::WaitForEvent",
                            "received",
                            json!({ "signed_by": "R. Costa" }),
                        )
                        .await?;
                }
            }
            names::STEP_RESUME => println!(
                "  [{instance}] {} resumed with :{}",
                field(&event, "step"),
                field(&event, "resume_event")
            ),
            names::WORKFLOW_STOP => {
                finished += 1;
                println!("  [{instance}] completed");
            }
            names::WORKFLOW_EXCEPTION => {
                finished += 1;
                println!("  [{instance}] failed: {}", field(&event, "reason"));
            }
            _ => {}
        }
    }

    for id in [started.id, rejected.id] {
        let instance = runtime.get(id).await?.context("instance exists")?;
        println!(
            "\n{} is {}; context:",
            instance.business_id, instance.status
        );
        println!("{}", serde_json::to_string_pretty(&instance.context)?);
        let steps: Vec<String> = instance
            .steps
            .iter()
            .map(|(s, st)| format!("{s}={}", st.status))
            .collect();
        println!("steps: {}", steps.join(", "));
    }
    Ok(())
}

/// [`demo`] made durable, for a backend that outlives the process (SQLite):
/// the orders `1001` and `1002` are started unless a run before this one
/// started them, and driven to their end. Steps whose results were
/// recorded before a crash do not run again: only what is left runs, and is
/// printed. The delivery wait is resumed whenever it is found waiting (a
/// resume that a killed run recorded already is not repeated). The
/// runtime's own worker loop runs the jobs meanwhile.
pub async fn run_durable<B: hephaestus_runner::Backend>(runtime: &Runtime<B>) -> Result<()> {
    use hephaestus_engine_core::instance::StepStatus;
    let mut events = runtime.subscribe();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = {
        let rt = runtime.clone();
        tokio::spawn(async move {
            rt.run(async {
                stopped.await.ok();
            })
            .await
        })
    };
    let orders = runtime.workflow("orders::Checkout")?;
    let mut ids = Vec::new();
    for (order, input) in [
        ("1001", json!({ "total": 42, "weight_kg": 3 })),
        ("1002", json!({ "total": 0 })),
    ] {
        if let Some(found) = orders.get(order).await? {
            let recorded: Vec<String> = found
                .steps
                .iter()
                .filter(|(_, st)| matches!(st.status, StepStatus::Completed | StepStatus::Failed))
                .map(|(s, _)| s.to_string())
                .collect();
            println!(
                "found {} ({}) {}; recorded before: {}",
                found.business_id,
                found.id,
                found.status,
                if recorded.is_empty() {
                    "nothing".to_owned()
                } else {
                    recorded.join(", ")
                }
            );
            ids.push(found.id);
        } else {
            let started = orders.start(order, input).await?;
            println!("started {} ({})", started.business_id, started.id);
            ids.push(started.id);
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        // What ran so far is printed first: a step's events are sent before
        // its result commits, so every step before a wait is printed before
        // the wait is seen below (a chain of steps, run as continuations,
        // reaches the wait faster than one event per look).
        while let Ok(event) = events.try_recv() {
            print_event(&event);
        }
        let mut finished = 0;
        for id in &ids {
            let instance = runtime.get(*id).await?.context("instance exists")?;
            if instance.status.is_terminal() {
                finished += 1;
            } else if instance
                .step("hephaestus::WaitForEvent")
                .is_some_and(|st| st.status == StepStatus::Waiting)
            {
                match runtime
                    .resume(
                        *id,
                        "hephaestus::WaitForEvent",
                        "received",
                        json!({ "signed_by": "R. Costa" }),
                    )
                    .await
                {
                    Ok(()) => {
                        println!("  [{}] the courier confirms delivery", instance.business_id);
                    }
                    // Recorded already (by a run before this one, say).
                    Err(hephaestus_runner::RunnerError::AlreadyResumed(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if finished == ids.len() {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the demo stalled");
        // Print what runs here while waiting (or look again shortly).
        if let Ok(Ok(event)) = tokio::time::timeout(Duration::from_millis(100), events.recv()).await
        {
            print_event(&event);
        }
    }
    while let Ok(event) = events.try_recv() {
        print_event(&event);
    }
    stop.send(()).ok();
    worker.await??;
    for id in ids {
        let instance = runtime.get(id).await?.context("instance exists")?;
        let steps: Vec<String> = instance
            .steps
            .iter()
            .map(|(s, st)| format!("{s}={}", st.status))
            .collect();
        println!(
            "\n{} is {}; steps: {}",
            instance.business_id,
            instance.status,
            steps.join(", ")
        );
    }
    Ok(())
}

/// A line for a telemetry event of [`run_durable`] (steps run, waits, ends).
fn print_event(event: &hephaestus_runner::TelemetryEvent) {
    let instance = event
        .metadata
        .get("business_id")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    match event.name {
        names::STEP_STOP => println!(
            "  [{instance}] ran {} -> :{}",
            field(event, "step"),
            field(event, "event")
        ),
        names::STEP_ASYNC => println!("  [{instance}] {} waits", field(event, "step")),
        names::WORKFLOW_STOP => println!("  [{instance}] completed"),
        names::WORKFLOW_EXCEPTION => {
            println!("  [{instance}] failed: {}", field(event, "reason"));
        }
        _ => {}
    }
}

/// A text field of a telemetry event's metadata (empty when absent).
fn field<'a>(event: &'a hephaestus_runner::TelemetryEvent, key: &str) -> &'a str {
    event
        .metadata
        .get(key)
        .and_then(|v| v.as_str())
        .unwrap_or("")
}
