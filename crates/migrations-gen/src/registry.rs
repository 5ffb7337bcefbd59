//! The ordered set of components whose migrations are generated together.

use std::collections::HashSet;

use crate::component::Component;
use crate::error::Error;

/// Components in dependency order: a component may only reference tables of components
/// registered before it (for example a foreign key to `hephaestus_instances`).
///
/// Generated files are applied by sqlx in `sqlx_version` order, so every component's
/// versions must carry sqlx versions greater than those of the versions they depend on.
/// [`Registry::new`] enforces the part of that it can see: each component's first version
/// comes after the first version of every component registered before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    components: Vec<Component>,
}

impl Registry {
    /// Validates that names and sqlx versions are unique and that the order above holds.
    pub fn new(components: Vec<Component>) -> Result<Self, Error> {
        let mut names = HashSet::new();
        let mut sqlx_versions = HashSet::new();
        let mut previous_first: Option<(&str, i64)> = None;
        for component in &components {
            let invalid = |problem: String| Error::InvalidComponent {
                component: component.name().to_owned(),
                problem,
            };
            if !names.insert(component.name()) {
                return Err(invalid("registered twice".to_owned()));
            }
            for version in component.versions() {
                if !sqlx_versions.insert(version.sqlx_version) {
                    return Err(invalid(format!(
                        "sqlx version {} of v{} is used by another migration",
                        version.sqlx_version, version.number
                    )));
                }
            }
            let first = component.versions()[0].sqlx_version;
            if let Some((previous, previous_sqlx)) = previous_first
                && first < previous_sqlx
            {
                return Err(invalid(format!(
                    "its v1 (sqlx version {first}) would run before v1 of \"{previous}\" (sqlx version {previous_sqlx}), which is registered before it"
                )));
            }
            previous_first = Some((component.name(), first));
        }
        Ok(Self { components })
    }

    /// All components, in dependency order.
    pub fn components(&self) -> &[Component] {
        &self.components
    }

    /// The component with this name.
    pub fn get(&self, name: &str) -> Result<&Component, Error> {
        self.components
            .iter()
            .find(|c| c.name() == name)
            .ok_or_else(|| Error::UnknownComponent(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::component::{Down, SchemaVersion};

    const fn version(number: u32, sqlx_version: i64) -> SchemaVersion {
        SchemaVersion {
            number,
            sqlx_version,
            description: "test",
            up: &["select 1"],
            down: Down::Statements(&[]),
        }
    }

    static A: [SchemaVersion; 2] = [version(1, 10), version(2, 30)];
    static B: [SchemaVersion; 1] = [version(1, 20)];
    static B_EARLY: [SchemaVersion; 1] = [version(1, 5)];
    static B_CLASH: [SchemaVersion; 1] = [version(1, 30)];

    #[test]
    fn components_are_found_by_name() {
        let registry = crate::fixture::registry();
        assert_eq!(registry.components()[0].name(), "fixture");
        assert!(registry.get("fixture").is_ok());
        assert!(matches!(
            registry.get("nope"),
            Err(Error::UnknownComponent(name)) if name == "nope"
        ));
    }

    #[test]
    fn accepts_interleaved_versions_in_dependency_order() {
        let a = Component::new("a", &A).unwrap();
        let b = Component::new("b", &B).unwrap();
        assert!(Registry::new(vec![a, b]).is_ok());
    }

    #[test]
    fn rejects_duplicates_and_wrong_order() {
        let a = Component::new("a", &A).unwrap();
        let b_early = Component::new("b", &B_EARLY).unwrap();
        let b_clash = Component::new("b", &B_CLASH).unwrap();
        for (components, needle) in [
            (vec![a, a], "registered twice"),
            (vec![a, b_clash], "used by another migration"),
            (vec![a, b_early], "would run before"),
        ] {
            let err = Registry::new(components).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
    }
}
