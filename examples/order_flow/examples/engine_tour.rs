//! A tour of the pure engine with the demo's `orders::Checkout` workflow:
//! branching, a fan-out and fan-in, a dynamic route, an async step resumed
//! by an external event, and a durable timer.
//!
//! The engine does no I/O: this program plays the runner. It executes the
//! steps the engine asks for, feeds their outcomes back, and moves a virtual
//! clock to fire timers. (The durable runner does the same with jobs.)
//!
//! Run: `cargo run -p order-flow --example engine_tour`

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, Wake, Waker};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use hephaestus_engine_core::prelude::*;
use hephaestus_engine_core::steps::WAIT_FOR_EVENT_ID;
use hephaestus_engine_core::{CancellationSignal, IdempotencyKey};
use serde_json::json;
use uuid::Uuid;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let workflow = order_flow::checkout()?;
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
            now += chrono::Duration::from_std(Duration::from_secs(30))?;
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
