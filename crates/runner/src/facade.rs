//! A typed handle per workflow, addressing instances by business value — the
//! counterpart of the original's generated `start/resume/get/list/cancel`.

use hephaestus_engine_core::instance::Instance;
use hephaestus_engine_core::ports::InstanceFilter;
use serde::Serialize;
use serde_json::Value;

use crate::backend::Backend;
use crate::error::RunnerError;
use crate::handle::Runtime;
use crate::runtime::{StartOptions, Started};

/// Calls on one registered workflow (or family) by business value.
#[derive(Debug)]
pub struct WorkflowHandle<'a, B> {
    runtime: &'a Runtime<B>,
    workflow: String,
}

impl<B: Backend> Runtime<B> {
    /// A handle on the registered workflow `id`.
    pub fn workflow(&self, id: &str) -> Result<WorkflowHandle<'_, B>, RunnerError> {
        self.registry().family(id)?;
        Ok(WorkflowHandle {
            runtime: self,
            workflow: id.to_owned(),
        })
    }
}

impl<B: Backend> WorkflowHandle<'_, B> {
    /// Starts an instance for `business_value` with `input` (any serializable value).
    pub async fn start(
        &self,
        business_value: &str,
        input: impl Serialize,
    ) -> Result<Started, RunnerError> {
        self.start_with(business_value, input, StartOptions::default())
            .await
    }

    /// Starts with options (version, telemetry metadata, id).
    pub async fn start_with(
        &self,
        business_value: &str,
        input: impl Serialize,
        options: StartOptions,
    ) -> Result<Started, RunnerError> {
        let input =
            serde_json::to_value(input).map_err(|e| RunnerError::InvalidInput(e.to_string()))?;
        self.runtime
            .start(&self.workflow, business_value, input, options)
            .await
    }

    /// Resumes `step` of the active instance for `business_value`.
    pub async fn resume(
        &self,
        business_value: &str,
        step: &str,
        event: &str,
        payload: Value,
    ) -> Result<(), RunnerError> {
        self.runtime
            .resume_by_business_value(&self.workflow, business_value, step, event, payload)
            .await
    }

    /// The active instance for `business_value`, else the latest finished one.
    pub async fn get(&self, business_value: &str) -> Result<Option<Instance>, RunnerError> {
        self.runtime
            .get_by_business_value(&self.workflow, business_value)
            .await
    }

    /// Instances of this workflow (every version) matching `filter`; the
    /// filter's workflow is this one whatever it said.
    pub async fn list(&self, filter: InstanceFilter) -> Result<Vec<Instance>, RunnerError> {
        let family = self.runtime.registry().family(&self.workflow)?;
        let filter = filter.with_workflow_id(family.id().clone());
        self.runtime.list(&filter).await
    }

    /// Cancels the active instance for `business_value`.
    pub async fn cancel(
        &self,
        business_value: &str,
        reason: Option<String>,
    ) -> Result<(), RunnerError> {
        self.runtime
            .cancel_by_business_value(&self.workflow, business_value, reason)
            .await
    }
}
