//! Versioned workflow families and the registry the runtime resolves
//! instances against.
//!
//! A family groups versions of one workflow id. New instances use the
//! version asked for, else the selector's choice, else `current`; an instance
//! keeps the version it started with for its whole life (snapshot at start).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::{Workflow, WorkflowError, WorkflowErrors};
use crate::business_id::Unique;
use crate::ids::WorkflowId;

/// What a version selector sees when a new instance starts.
#[derive(Debug, Clone, Copy)]
pub struct StartSelection<'a> {
    /// The business value the instance starts with.
    pub business_value: &'a str,
    /// The start input.
    pub input: &'a Value,
    /// The caller's telemetry metadata (routing hints such as tenant).
    pub metadata: &'a Map<String, Value>,
}

type Selector = Arc<dyn Fn(&StartSelection<'_>) -> Option<u32> + Send + Sync>;

/// The versions of one workflow.
#[derive(Clone)]
pub struct WorkflowFamily {
    id: WorkflowId,
    versions: BTreeMap<u32, Workflow>,
    current: u32,
    selector: Option<Selector>,
}

impl fmt::Debug for WorkflowFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkflowFamily")
            .field("id", &self.id)
            .field("versions", &self.versions.keys().collect::<Vec<_>>())
            .field("current", &self.current)
            .field("selector", &self.selector.is_some())
            .finish()
    }
}

/// Lookup and resolution failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// No workflow with this id is registered.
    #[error("workflow {0} is not registered")]
    UnknownWorkflow(String),
    /// The family has no such version.
    #[error("version {requested} not found for {workflow}. Available: [{}]", available.iter().map(u32::to_string).collect::<Vec<_>>().join(", "))]
    UnknownVersion {
        /// The family.
        workflow: String,
        /// The version asked for.
        requested: u32,
        /// The registered versions.
        available: Vec<u32>,
    },
    /// A standalone workflow was asked for another version.
    #[error(
        "{workflow} is not a versioned workflow; it only supports version {version}, got: {requested}"
    )]
    NotVersioned {
        /// The workflow.
        workflow: String,
        /// Its only version.
        version: u32,
        /// The version asked for.
        requested: u32,
    },
    /// The workflow id is registered twice.
    #[error("workflow {0} is registered twice")]
    DuplicateWorkflow(String),
}

impl WorkflowFamily {
    /// Starts a family named `id`.
    pub fn builder(id: impl Into<String>) -> FamilyBuilder {
        FamilyBuilder {
            id: id.into(),
            members: Vec::new(),
            current: None,
            selector: None,
        }
    }

    /// A family of one standalone workflow.
    pub fn standalone(workflow: Workflow) -> Self {
        Self {
            id: workflow.id().clone(),
            current: workflow.version(),
            versions: BTreeMap::from([(workflow.version(), workflow)]),
            selector: None,
        }
    }

    /// The family id.
    pub fn id(&self) -> &WorkflowId {
        &self.id
    }

    /// The version new instances get by default.
    pub fn current_version(&self) -> u32 {
        self.current
    }

    /// The registered versions.
    pub fn versions(&self) -> impl Iterator<Item = (u32, &Workflow)> {
        self.versions.iter().map(|(v, w)| (*v, w))
    }

    /// The family's unique rule (shared by every version).
    pub fn unique(&self) -> &Unique {
        self.versions[&self.current].unique()
    }

    /// A version, if registered.
    pub fn version(&self, version: u32) -> Option<&Workflow> {
        self.versions.get(&version)
    }

    /// Resolves the version for a new instance: the requested one, else the
    /// selector's pick, else `current`. Resolved BEFORE the uniqueness check,
    /// so scope `version` uses the version the instance really gets.
    pub fn resolve(
        &self,
        requested: Option<u32>,
        selection: &StartSelection<'_>,
    ) -> Result<&Workflow, RegistryError> {
        let version = requested
            .or_else(|| self.selector.as_ref().and_then(|f| f(selection)))
            .unwrap_or(self.current);
        self.versions
            .get(&version)
            .ok_or_else(|| RegistryError::UnknownVersion {
                workflow: self.id.to_string(),
                requested: version,
                available: self.versions.keys().copied().collect(),
            })
    }
}

/// Collects a family; [`FamilyBuilder::build`] validates it.
pub struct FamilyBuilder {
    id: String,
    members: Vec<(u32, Workflow)>,
    current: Option<u32>,
    selector: Option<Selector>,
}

impl fmt::Debug for FamilyBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FamilyBuilder")
            .field("id", &self.id)
            .field("members", &self.members.len())
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl FamilyBuilder {
    /// Adds a version under its own version number.
    #[must_use]
    pub fn version(mut self, workflow: Workflow) -> Self {
        self.members.push((workflow.version(), workflow));
        self
    }

    /// Adds a version under an explicit key (must equal its own version).
    #[must_use]
    pub fn version_as(mut self, key: u32, workflow: Workflow) -> Self {
        self.members.push((key, workflow));
        self
    }

    /// The version new instances get by default (default: the highest).
    #[must_use]
    pub fn current(mut self, version: u32) -> Self {
        self.current = Some(version);
        self
    }

    /// Picks a version per start (return `None` for `current`).
    #[must_use]
    pub fn selector<F>(mut self, f: F) -> Self
    where
        F: Fn(&StartSelection<'_>) -> Option<u32> + Send + Sync + 'static,
    {
        self.selector = Some(Arc::new(f));
        self
    }

    /// Validates the family rules and builds it.
    pub fn build(self) -> Result<WorkflowFamily, WorkflowErrors> {
        let mut errors = Vec::new();
        let id = WorkflowId::new(&self.id)
            .map_err(|e| errors.push(WorkflowError::InvalidWorkflowId(e)))
            .ok();
        if self.members.is_empty() {
            errors.push(WorkflowError::EmptyFamily(self.id.clone()));
        }
        let mut versions: BTreeMap<u32, Workflow> = BTreeMap::new();
        for (key, wf) in &self.members {
            if *key == 0 {
                errors.push(WorkflowError::InvalidVersionKey(0));
                continue;
            }
            if versions.contains_key(key) {
                errors.push(WorkflowError::DuplicateVersion {
                    family: self.id.clone(),
                    version: *key,
                });
                continue;
            }
            versions.insert(*key, wf.clone());
        }
        let current = self
            .current
            .or_else(|| versions.keys().next_back().copied())
            .unwrap_or(0);
        if self.current.is_some() && !versions.contains_key(&current) {
            errors.push(WorkflowError::CurrentNotAVersion {
                current,
                available: versions.keys().copied().collect(),
            });
        }
        for (key, wf) in &self.members {
            if *key != 0 && wf.version() != *key {
                errors.push(WorkflowError::VersionMismatch {
                    workflow: wf.id().to_string(),
                    actual: wf.version(),
                    key: *key,
                });
            }
        }
        for (key, wf) in &self.members {
            if wf.id().as_str() != self.id {
                errors.push(WorkflowError::NotNestedUnderFamily {
                    workflow: wf.id().to_string(),
                    key: *key,
                    family: self.id.clone(),
                });
            }
        }
        if let Some((_, first)) = self.members.first() {
            for (key, wf) in &self.members[1..] {
                if wf.unique() != first.unique() {
                    errors.push(WorkflowError::UniqueMismatch {
                        family: self.id.clone(),
                        key: *key,
                        expected: format!("{}/{}", first.unique().key, first.unique().scope),
                        actual: format!("{}/{}", wf.unique().key, wf.unique().scope),
                    });
                }
            }
        }
        match id {
            Some(id) if errors.is_empty() => Ok(WorkflowFamily {
                id,
                versions,
                current,
                selector: self.selector,
            }),
            _ => Err(WorkflowErrors {
                workflow: self.id,
                errors,
            }),
        }
    }
}

/// Every workflow a runtime knows, by id; standalone workflows are families
/// of one.
#[derive(Debug, Clone, Default)]
pub struct WorkflowRegistry {
    families: BTreeMap<WorkflowId, WorkflowFamily>,
}

impl WorkflowRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a standalone workflow.
    pub fn register(&mut self, workflow: Workflow) -> Result<(), RegistryError> {
        self.register_family(WorkflowFamily::standalone(workflow))
    }

    /// Registers a family.
    pub fn register_family(&mut self, family: WorkflowFamily) -> Result<(), RegistryError> {
        if self.families.contains_key(family.id()) {
            return Err(RegistryError::DuplicateWorkflow(family.id().to_string()));
        }
        self.families.insert(family.id().clone(), family);
        Ok(())
    }

    /// The family registered as `id`.
    pub fn family(&self, id: &str) -> Result<&WorkflowFamily, RegistryError> {
        self.families
            .get(id)
            .ok_or_else(|| RegistryError::UnknownWorkflow(id.to_owned()))
    }

    /// The exact version an existing instance runs.
    pub fn get(&self, id: &str, version: u32) -> Result<&Workflow, RegistryError> {
        let family = self.family(id)?;
        family
            .version(version)
            .ok_or_else(|| RegistryError::UnknownVersion {
                workflow: id.to_owned(),
                requested: version,
                available: family.versions.keys().copied().collect(),
            })
    }

    /// Every family.
    pub fn families(&self) -> impl Iterator<Item = &WorkflowFamily> {
        self.families.values()
    }
}
