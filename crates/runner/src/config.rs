//! Runner configuration.

use std::time::Duration;

/// Queue names per job kind. One shared queue by default; start from
/// [`QueueNames::shared`] (or [`Default`]) and move job kinds to queues of
/// their own with the `with_*` methods (a job kind added later gets a queue
/// without breaking you).
///
/// ```
/// use hephaestus_runner::QueueNames;
///
/// // Step executions get their own queue (and so their own concurrency).
/// let queues = QueueNames::shared("hephaestus").with_execute("steps");
/// assert_eq!(queues.distinct(), ["hephaestus", "steps"]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueNames {
    /// Advance jobs.
    pub advance: String,
    /// Step executions.
    pub execute: String,
    /// Timers and scheduled resumes.
    pub timer: String,
}

impl QueueNames {
    /// Every job kind on one queue.
    pub fn shared(name: &str) -> Self {
        Self {
            advance: name.to_owned(),
            execute: name.to_owned(),
            timer: name.to_owned(),
        }
    }

    /// Sets the queue of advance jobs (see [`QueueNames::advance`]).
    #[must_use]
    pub fn with_advance(mut self, value: impl Into<String>) -> Self {
        self.advance = value.into();
        self
    }

    /// Sets the queue of step executions (see [`QueueNames::execute`]).
    #[must_use]
    pub fn with_execute(mut self, value: impl Into<String>) -> Self {
        self.execute = value.into();
        self
    }

    /// Sets the queue of timers and scheduled resumes (see [`QueueNames::timer`]).
    #[must_use]
    pub fn with_timer(mut self, value: impl Into<String>) -> Self {
        self.timer = value.into();
        self
    }

    /// The distinct queue names.
    pub fn distinct(&self) -> Vec<String> {
        let mut out = vec![self.advance.clone()];
        for q in [&self.execute, &self.timer] {
            if !out.contains(q) {
                out.push(q.clone());
            }
        }
        out
    }
}

impl Default for QueueNames {
    fn default() -> Self {
        Self::shared("hephaestus")
    }
}

/// How the runner behaves. Start from [`RunnerConfig::default`] and change
/// what you need with the `with_*` methods (new settings may be added
/// without breaking you).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunnerConfig {
    /// Queue names per job kind.
    pub queues: QueueNames,
    /// Attempts of advance, timer and resume jobs before they are discarded.
    pub advance_max_attempts: u32,
    /// How many jobs a worker runs at once.
    pub concurrency: usize,
    /// How often an idle worker polls for due jobs.
    pub poll_interval: Duration,
    /// How many times an advance loops when results keep arriving.
    pub advance_loop_limit: u32,
    /// How often a worker refreshes the heartbeat of the jobs it runs.
    pub heartbeat_interval: Duration,
    /// A running job whose heartbeat is older than this is rescued: its
    /// worker is presumed dead.
    pub stale_after: Duration,
    /// How often a worker looks for stale jobs to rescue.
    pub rescue_interval: Duration,
    /// Most finished steps and advance jobs settled in one unit of work (the
    /// batched orchestration: results recorded, instances advanced and jobs
    /// completed together), and most execution pre-checks read in one
    /// statement. `1` settles every job on its own.
    pub max_batch: usize,
    /// Units of work of the batched orchestration in flight at once: while
    /// they all run, new work queues up and goes into the next batch.
    pub batch_flushers: usize,
    /// A worker whose step's result activated further steps of the same
    /// instance claims one of their jobs in the settling unit of work and
    /// runs it right away in the same slot (its heartbeat kept by the
    /// runner), instead of waiting for the queue to deliver it: a chain of
    /// steps costs one commit per step and no queue round trip. Backends
    /// that cannot claim in [`Backend::enqueue_and_complete`](crate::Backend::enqueue_and_complete)
    /// ignore it.
    pub continuations: bool,
    /// This runtime's name, reported by `hephaestus.runner.init` (the
    /// original's `name`): tell workers apart in telemetry.
    pub name: String,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            queues: QueueNames::default(),
            advance_max_attempts: 20,
            concurrency: 10,
            poll_interval: Duration::from_millis(200),
            advance_loop_limit: 16,
            heartbeat_interval: Duration::from_secs(5),
            stale_after: Duration::from_secs(30),
            rescue_interval: Duration::from_secs(15),
            max_batch: 128,
            batch_flushers: 2,
            continuations: true,
            name: "hephaestus".to_owned(),
        }
    }
}

impl RunnerConfig {
    /// Sets the queue names per job kind (see [`RunnerConfig::queues`]).
    #[must_use]
    pub fn with_queues(mut self, value: QueueNames) -> Self {
        self.queues = value;
        self
    }

    /// Sets the attempts of advance, timer and resume jobs (see [`RunnerConfig::advance_max_attempts`]).
    #[must_use]
    pub fn with_advance_max_attempts(mut self, value: u32) -> Self {
        self.advance_max_attempts = value;
        self
    }

    /// Sets how many jobs a worker runs at once (see [`RunnerConfig::concurrency`]).
    #[must_use]
    pub fn with_concurrency(mut self, value: usize) -> Self {
        self.concurrency = value;
        self
    }

    /// Sets how often an idle worker polls (see [`RunnerConfig::poll_interval`]).
    #[must_use]
    pub fn with_poll_interval(mut self, value: Duration) -> Self {
        self.poll_interval = value;
        self
    }

    /// Sets how many times an advance loops (see [`RunnerConfig::advance_loop_limit`]).
    #[must_use]
    pub fn with_advance_loop_limit(mut self, value: u32) -> Self {
        self.advance_loop_limit = value;
        self
    }

    /// Sets how often a worker refreshes heartbeats (see [`RunnerConfig::heartbeat_interval`]).
    #[must_use]
    pub fn with_heartbeat_interval(mut self, value: Duration) -> Self {
        self.heartbeat_interval = value;
        self
    }

    /// Sets the heartbeat age after which a job is rescued (see [`RunnerConfig::stale_after`]).
    #[must_use]
    pub fn with_stale_after(mut self, value: Duration) -> Self {
        self.stale_after = value;
        self
    }

    /// Sets how often a worker looks for stale jobs (see [`RunnerConfig::rescue_interval`]).
    #[must_use]
    pub fn with_rescue_interval(mut self, value: Duration) -> Self {
        self.rescue_interval = value;
        self
    }

    /// Sets the most items settled in one unit of work (see [`RunnerConfig::max_batch`]).
    #[must_use]
    pub fn with_max_batch(mut self, value: usize) -> Self {
        self.max_batch = value;
        self
    }

    /// Sets the settling units of work in flight at once (see [`RunnerConfig::batch_flushers`]).
    #[must_use]
    pub fn with_batch_flushers(mut self, value: usize) -> Self {
        self.batch_flushers = value;
        self
    }

    /// Sets whether workers run the steps their results activate right away (see [`RunnerConfig::continuations`]).
    #[must_use]
    pub fn with_continuations(mut self, value: bool) -> Self {
        self.continuations = value;
        self
    }

    /// Sets this runtime's name (see [`RunnerConfig::name`]).
    #[must_use]
    pub fn with_name(mut self, value: impl Into<String>) -> Self {
        self.name = value.into();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_default_to_one_shared_queue() {
        let queues = QueueNames::default();
        assert_eq!(
            (
                queues.advance.as_str(),
                queues.execute.as_str(),
                queues.timer.as_str()
            ),
            ("hephaestus", "hephaestus", "hephaestus")
        );
    }

    #[test]
    fn queue_names_setters_set_their_own_kind() {
        let queues = QueueNames::shared("q")
            .with_advance("a")
            .with_execute("e")
            .with_timer("t");
        assert_eq!(
            queues,
            QueueNames {
                advance: "a".to_owned(),
                execute: "e".to_owned(),
                timer: "t".to_owned(),
            }
        );
        let split = QueueNames::shared("q").with_execute("e");
        assert_eq!(split.distinct(), ["q", "e"]);
    }
}
