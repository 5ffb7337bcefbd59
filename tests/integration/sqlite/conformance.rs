//! The conformance suites on SQLite: one test per case, each on a fresh
//! migrated file of its own, deleted after it.

use crate::support::sqlite::{fresh_alone, remove};

mod instance_store {
    hephaestus_conformance::conformance_tests!(
        instance_store,
        make: super::fresh_alone,
        run: crate::support::conformance::run,
        cleanup: super::remove,
    );
}

mod step_result_store {
    hephaestus_conformance::conformance_tests!(
        step_result_store,
        make: super::fresh_alone,
        run: crate::support::conformance::run,
        cleanup: super::remove,
    );
}

mod job_queue {
    hephaestus_conformance::conformance_tests!(
        job_queue,
        make: super::fresh_alone,
        run: crate::support::conformance::run,
        cleanup: super::remove,
    );
}

mod backend {
    hephaestus_conformance::backend_conformance_tests!(
        make: super::fresh_alone,
        run: crate::support::conformance::run,
        cleanup: super::remove,
    );
}
