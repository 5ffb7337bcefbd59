//! Every conformance case on the in-memory backend, one test each.

use std::future::Future;

use hephaestus_memory::MemoryBackend;

fn run<F: Future>(case: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(case)
}

mod instance_store {
    hephaestus_conformance::conformance_tests!(
        instance_store,
        make: || async { super::MemoryBackend::new() },
        run: super::run,
    );
}

mod step_result_store {
    hephaestus_conformance::conformance_tests!(
        step_result_store,
        make: || async { super::MemoryBackend::new() },
        run: super::run,
    );
}

mod job_queue {
    hephaestus_conformance::conformance_tests!(
        job_queue,
        make: || async { super::MemoryBackend::new() },
        run: super::run,
    );
}

/// The runner's batched operations through their defaults (the memory
/// backend overrides none).
mod backend {
    hephaestus_conformance::backend_conformance_tests!(
        make: || async { super::MemoryBackend::new() },
        run: super::run,
    );
}

#[test]
fn the_report_form_runs_every_case() {
    let report = run(hephaestus_conformance::ports::instance_store(|| async {
        MemoryBackend::new()
    }));
    report.assert_ok();
    assert_eq!(report.passed.len(), 15, "{report}");
}
