//! Helpers for this crate's unit tests: a minimal executor and step runner.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, Wake, Waker};
use std::thread::Thread;

use serde_json::Value;
use uuid::Uuid;

use crate::context::Context;
use crate::ids::IdempotencyKey;
use crate::step::{CancellationSignal, Step, StepInput, StepOutcome};

struct ThreadWaker(Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs a future to completion on the current thread.
pub(crate) fn block_on<F: Future>(fut: F) -> F::Output {
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = TaskContext::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(out) => return out,
            Poll::Pending => std::thread::park(),
        }
    }
}

/// Executes a step once with an empty context.
pub(crate) async fn run_step(step: &dyn Step, config: Option<&Value>) -> StepOutcome {
    let context = Context::default();
    let input = StepInput {
        context: &context,
        config,
        instance_id: Uuid::nil(),
        business_id: "test::1",
        activation: 1,
        attempt: 1,
        idempotency_key: IdempotencyKey {
            instance_id: Uuid::nil(),
            step: step.id(),
            activation: 1,
        },
        cancellation: CancellationSignal::new(),
    };
    step.execute(input).await
}
