//! Telemetry: engine events turned into `tracing` events named after the
//! original's telemetry (`hephaestus.workflow.stop`, ...). Caller metadata is
//! attached but cannot override the system fields.

use hephaestus_engine_core::engine::EngineEvent;
use hephaestus_engine_core::instance::Instance;

/// Emits the events an advance produced for `instance`.
pub(crate) fn emit(instance: &Instance, events: &[EngineEvent]) {
    let caller = serde_json::Value::Object(instance.telemetry_metadata.clone());
    for event in events {
        match event {
            EngineEvent::WorkflowStarted { start } => tracing::debug!(
                target: "hephaestus.engine.advance",
                instance_id = %instance.id,
                business_id = %instance.business_id,
                workflow = %instance.workflow_id,
                workflow_version = instance.workflow_version,
                initial_step = %start,
                metadata = %caller,
                "Workflow started"
            ),
            EngineEvent::Transition {
                from,
                event,
                targets,
            } => tracing::debug!(
                target: "hephaestus.workflow.transition",
                instance_id = %instance.id,
                workflow = %instance.workflow_id,
                workflow_version = instance.workflow_version,
                from_step = %from,
                event = %event,
                targets = ?targets,
                fan_out = targets.len() > 1,
                metadata = %caller,
                "Transition"
            ),
            EngineEvent::StepAsync { step } => tracing::info!(
                target: "hephaestus.step.async",
                instance_id = %instance.id,
                workflow = %instance.workflow_id,
                step = %step,
                instance_status = %instance.status,
                metadata = %caller,
                "Step waiting for async event"
            ),
            EngineEvent::StepResumed {
                step,
                event,
                source,
            } => tracing::info!(
                target: "hephaestus.step.resume",
                instance_id = %instance.id,
                workflow = %instance.workflow_id,
                step = %step,
                resume_event = %event,
                source = ?source,
                metadata = %caller,
                "Step resumed"
            ),
            EngineEvent::StepsDead { steps } => tracing::debug!(
                target: "hephaestus.workflow.transition",
                instance_id = %instance.id,
                dead_steps = ?steps,
                "Paths not taken"
            ),
            EngineEvent::ResumeDropped { step, event } => tracing::warn!(
                target: "hephaestus.step.resume",
                instance_id = %instance.id,
                step = %step,
                resume_event = %event,
                "A resume that arrived while the step ran was dropped: the step completed"
            ),
            EngineEvent::WorkflowCompleted => tracing::info!(
                target: "hephaestus.workflow.stop",
                instance_id = %instance.id,
                business_id = %instance.business_id,
                workflow = %instance.workflow_id,
                workflow_version = instance.workflow_version,
                status = "completed",
                metadata = %caller,
                "Workflow completed"
            ),
            EngineEvent::WorkflowFailed { step, message } => tracing::error!(
                target: "hephaestus.workflow.exception",
                instance_id = %instance.id,
                business_id = %instance.business_id,
                workflow = %instance.workflow_id,
                workflow_version = instance.workflow_version,
                failed_step = ?step,
                reason = %message,
                metadata = %caller,
                "Workflow failed"
            ),
            EngineEvent::WorkflowCancelled { reason } => tracing::info!(
                target: "hephaestus.workflow.cancel",
                instance_id = %instance.id,
                business_id = %instance.business_id,
                reason = ?reason,
                "Workflow cancelled"
            ),
        }
    }
}
