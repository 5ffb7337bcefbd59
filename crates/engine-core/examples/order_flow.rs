//! A tour of the pure engine: an order workflow with branching, a fan-out and
//! fan-in, an async step resumed by an external event, and a durable timer.
//!
//! The engine does no I/O: this program plays the runner. It executes the
//! steps the engine asks for, feeds their outcomes back, and moves a virtual
//! clock to fire timers. (The durable runner does the same with Postgres jobs.)
//!
//! Run: `cargo run -p hephaestus-engine-core --example order_flow`

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, Wake, Waker};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use hephaestus_engine_core::prelude::*;
use hephaestus_engine_core::steps::{Done, FnStep, WAIT_FOR_EVENT_ID, Wait, WaitForEvent};
use hephaestus_engine_core::{CancellationSignal, IdempotencyKey, Pick};
use serde_json::json;
use uuid::Uuid;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let validate = FnStep::new("orders::Validate", ["valid", "invalid"], |input| {
        let total = input.context.initial["total"].as_u64().unwrap_or(0);
        if total > 0 {
            StepOutcome::complete_with("valid", json!({"total": total}))
        } else {
            StepOutcome::complete_with("invalid", json!({"reason": "empty order"}))
        }
    });
    let charge = FnStep::new("orders::ChargeCard", ["charged"], |input| {
        StepOutcome::complete_with(
            "charged",
            json!({"payment_id": format!("pay-{}", input.idempotency_key)}),
        )
    });
    let reserve = FnStep::new("orders::ReserveStock", ["reserved"], |_| {
        StepOutcome::complete_with("reserved", json!({"warehouse": "lisbon"}))
    });
    let pack = FnStep::new("orders::Pack", ["packed"], |input| {
        let heavy = input.context.initial["weight_kg"].as_u64().unwrap_or(0) > 20;
        StepOutcome::complete_with("packed", json!({"heavy": heavy}))
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

    let workflow = Workflow::builder("orders::Checkout")
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
            json!({"timeout_ms": 86_400_000}),
        )
        .on_with(
            courier,
            "booked",
            WaitForEvent,
            json!({"timeout_ms": 86_400_000}),
        )
        .on(WaitForEvent, "received", Done)
        .on_with(
            WaitForEvent,
            "timeout",
            Wait,
            json!({"duration": 1, "unit": "hour"}),
        )
        .on(Wait, "timeout", Done)
        .build()?;

    let engine = Engine::new(&workflow);
    let mut now = Utc
        .with_ymd_and_hms(2026, 11, 26, 9, 0, 0)
        .single()
        .ok_or("bad date")?;
    let mut instance = engine.new_instance(NewInstance {
        id: Uuid::now_v7(),
        business_id: BusinessId::parse("order::1001")?,
        input: json!({"total": 42, "weight_kg": 3}),
        telemetry_metadata: serde_json::Map::new(),
        now,
    })?;
    println!("instance {} ({})", instance.id, instance.business_id);

    let mut queue: Vec<(StepId, u32)> = Vec::new();
    let mut timers: Vec<(StepId, u32, chrono::DateTime<Utc>, Event)> = Vec::new();
    let apply = |instance: &mut Instance,
                 input: Input,
                 now,
                 queue: &mut Vec<(StepId, u32)>,
                 timers: &mut Vec<_>| {
        let applied = engine
            .apply(instance, input, now)
            .expect("inputs of this demo are valid");
        for effect in applied.effects {
            match effect {
                Effect::Execute { step, activation } => queue.push((step, activation)),
                Effect::ScheduleTimer {
                    step,
                    activation,
                    fire_at,
                    event,
                } => {
                    println!("  timer for {step} at {fire_at}");
                    timers.push((step, activation, fire_at, event));
                }
                Effect::CancelTimer { step, activation } => {
                    timers.retain(|t| !(t.0 == step && t.1 == activation));
                }
                Effect::CancelJobs => {
                    queue.clear();
                    timers.clear();
                }
                Effect::Emit(event) => println!(
                    "  event: {}",
                    serde_json::to_string(&event).unwrap_or_default()
                ),
            }
        }
    };

    apply(&mut instance, Input::Start, now, &mut queue, &mut timers);
    let mut resumed = false;
    loop {
        while let Some((step, activation)) = queue.pop() {
            let def = workflow.step(step.as_str()).ok_or("unknown step")?;
            let input = StepInput {
                context: &instance.context,
                config: instance.step_configs.get(&step),
                instance_id: instance.id,
                business_id: instance.business_id.as_str(),
                activation,
                attempt: 1,
                idempotency_key: IdempotencyKey {
                    instance_id: instance.id,
                    step: step.clone(),
                    activation,
                },
                cancellation: CancellationSignal::new(),
            };
            let outcome = block_on(def.step.execute(input));
            println!("ran {step} -> {outcome:?}");
            if let Some(input) = Input::from_outcome(step, activation, outcome) {
                apply(&mut instance, input, now, &mut queue, &mut timers);
            }
        }
        println!("status: {}", instance.status);
        if instance.status != InstanceStatus::Waiting {
            break;
        }
        if resumed {
            // Nobody confirms the delivery: let the virtual clock run to the timer.
            let (step, activation, fire_at, event) = timers.remove(0);
            now = fire_at;
            println!("clock -> {now}: timer fires for {step}");
            apply(
                &mut instance,
                Input::TimerFired {
                    step,
                    activation,
                    event,
                },
                now,
                &mut queue,
                &mut timers,
            );
        } else {
            resumed = true;
            now += chrono::Duration::from_std(Duration::from_secs(7200))?;
            println!("clock -> {now}: the courier confirms delivery");
            apply(
                &mut instance,
                Input::Resume {
                    step: StepId::new(WAIT_FOR_EVENT_ID)?,
                    activation: None,
                    event: Event::new("received")?,
                    payload: json!({"signed_by": "R. Costa"}),
                },
                now,
                &mut queue,
                &mut timers,
            );
        }
    }
    println!(
        "final context: {}",
        serde_json::to_string_pretty(&instance.context)?
    );
    println!("history: {} entries", instance.history.len());
    Ok(())
}

struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

fn block_on<F: Future>(fut: F) -> F::Output {
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = TaskContext::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}
