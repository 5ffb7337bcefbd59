//! Continuations: after a settle commits, the worker whose job it settled
//! may run, in the same slot, a step execution its instance's round just
//! enqueued, instead of waiting for a fetch to hand it out. This module
//! decides who takes which job (before the enqueue, which claims them) and
//! hands the claimed leases to their takers (after the commit).
//!
//! Each taker takes at most one job for its own slot; what is left of a
//! fan-out goes to takers while the runtime has extra slots (each extra
//! continuation runs in a task of its own, holding one).

use std::collections::HashMap;
use std::sync::Arc;

use hephaestus_engine_core::Workflow;
use hephaestus_engine_core::instance::Instance;
use hephaestus_engine_core::ports::{Enqueued, JobLease, NewJob};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::jobs;
use crate::outcome::Continuation;

/// A job a settled item takes: the item's index in its batch, the job's
/// index among the enqueued ones, and for a continuation beyond the item's
/// first, the extra slot it runs in.
#[derive(Debug)]
pub(crate) struct Taker {
    pub item: usize,
    pub job: usize,
    pub permit: Option<OwnedSemaphorePermit>,
}

/// Who takes what: `claim[j]` says whether the `j`-th new job is enqueued
/// claimed by this worker, and `takers` says by whom.
#[derive(Debug, Default)]
pub(crate) struct Offer {
    pub claim: Vec<bool>,
    pub takers: Vec<Taker>,
}

/// Decides the continuations of a batch: `candidates` are the items that
/// can run one (index and instance, in the order they are served),
/// `new_jobs` the jobs about to be enqueued with the instance each belongs
/// to. Only execute jobs are offered, each to an item of its own instance.
pub(crate) fn offer(
    candidates: &[(usize, Uuid)],
    new_jobs: &[(Uuid, NewJob)],
    extra_slots: &Arc<Semaphore>,
) -> Offer {
    let mut offers: HashMap<Uuid, Vec<usize>> = HashMap::new();
    for (index, (owner, job)) in new_jobs.iter().enumerate() {
        if job.kind == jobs::EXECUTE {
            offers.entry(*owner).or_default().push(index);
        }
    }
    // Popped from the back: the first enqueued is offered first.
    for list in offers.values_mut() {
        list.reverse();
    }
    let mut takers = Vec::new();
    for &(item, instance) in candidates {
        if let Some(job) = offers.get_mut(&instance).and_then(Vec::pop) {
            takers.push(Taker {
                item,
                job,
                permit: None,
            });
        }
    }
    // What is left of a fan-out goes to its takers while the runtime has
    // extra slots.
    for &(item, instance) in candidates {
        let Some(offered) = offers.get_mut(&instance) else {
            continue;
        };
        while !offered.is_empty() {
            let Ok(permit) = Arc::clone(extra_slots).try_acquire_owned() else {
                break;
            };
            if let Some(job) = offered.pop() {
                takers.push(Taker {
                    item,
                    job,
                    permit: Some(permit),
                });
            }
        }
    }
    let mut claim = vec![false; new_jobs.len()];
    for taker in &takers {
        claim[taker.job] = true;
    }
    Offer { claim, takers }
}

/// After the commit: each taker's claimed lease becomes a continuation
/// carrying its instance as the round wrote it (`written` finds it, with
/// its workflow). `give` receives each one with its item's index. A claim
/// with no taker is reported and left to the rescuer.
pub(crate) fn hand_out<'a>(
    takers: Vec<Taker>,
    mut enqueued: Vec<(Enqueued, Option<JobLease>)>,
    item_instance: impl Fn(usize) -> Uuid,
    written: impl Fn(Uuid) -> Option<(&'a Instance, &'a Workflow)>,
    mut give: impl FnMut(usize, Continuation),
) {
    let mut shared: HashMap<Uuid, Arc<Instance>> = HashMap::new();
    for taker in takers {
        let Some(lease) = enqueued
            .get_mut(taker.job)
            .and_then(|(_, lease)| lease.take())
        else {
            continue;
        };
        let instance_id = item_instance(taker.item);
        let Some((instance, wf)) = written(instance_id) else {
            continue;
        };
        let instance = shared
            .entry(instance_id)
            .or_insert_with(|| Arc::new(instance.clone()));
        give(
            taker.item,
            Continuation {
                lease,
                instance: Arc::clone(instance),
                wf: wf.clone(),
                permit: taker.permit,
            },
        );
    }
    for (_, lease) in enqueued {
        if let Some(lease) = lease {
            // Not expected: every claim has its taker. The job is left to
            // the rescuer, which returns it to work after `stale_after`.
            tracing::warn!(job_id = %lease.id, "a claimed continuation had no taker");
        }
    }
}

#[cfg(test)]
mod tests {
    use hephaestus_engine_core::ports::NewJob;
    use serde_json::json;

    use super::*;

    fn job(kind: &str) -> NewJob {
        NewJob::new(kind, "q", json!({}))
    }

    #[test]
    fn each_candidate_takes_one_job_of_its_instance_then_extra_slots_take_the_rest() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let new_jobs = vec![
            (a, job(jobs::EXECUTE)),
            (a, job(jobs::TIMER)),
            (b, job(jobs::EXECUTE)),
            (a, job(jobs::EXECUTE)),
            (a, job(jobs::EXECUTE)),
        ];
        let slots = Arc::new(Semaphore::new(1));
        let offer = offer(
            &[(0, a), (1, b), (2, Uuid::from_u128(3))],
            &new_jobs,
            &slots,
        );
        let taken: Vec<(usize, usize, bool)> = offer
            .takers
            .iter()
            .map(|t| (t.item, t.job, t.permit.is_some()))
            .collect();
        // Item 0 takes a's first execution, item 1 b's; the one extra slot
        // goes to a's next execution; a's last one waits for a fetch; the
        // timer is never offered.
        assert_eq!(taken, vec![(0, 0, false), (1, 2, false), (0, 3, true)]);
        assert_eq!(offer.claim, vec![true, false, true, true, false]);
        assert_eq!(slots.available_permits(), 0);
    }
}
