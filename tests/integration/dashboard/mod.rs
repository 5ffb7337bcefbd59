//! The web dashboard (`hephaestus-dashboard`) against PostgreSQL: its
//! handlers through the router (`handlers`: every view, action, bad
//! parameter, read-only mode, token and CSRF, the database going away and
//! coming back, a large instance's render time), the `hephaestus dashboard`
//! command (`cli`), and a real headless Chromium driving it end to end
//! (`browser`).
//!
//! Instances run in this process: a runtime with the stock binary's fixture
//! workflows plus the dashboard's own (a fan-out with a waiting branch, a
//! 500-way fan-out) whose jobs the tests drain.

mod browser;
mod cli;
mod handlers;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use hephaestus_dashboard::{Dashboard, DashboardConfig};
use hephaestus_engine_core::prelude::*;
use hephaestus_engine_core::steps::{Done, FnStep, WaitForEvent};
use hephaestus_queue_pg::PgQueue;
use hephaestus_runner::postgres::PgBackend;
use hephaestus_runner::{Runtime, StartOptions};
use hephaestus_storage_pg::PgStore;
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::Mutex;
use tower::ServiceExt as _;
use uuid::Uuid;

use crate::faults::fixtures;
use crate::support::db::TestSchema;

/// The token of the test dashboards.
pub const TOKEN: &str = "test-token-0123456789abcdef";

/// `Split ⇉ {Work, WaitForEvent} → Join → Done`: after a drain, Split and
/// Work are done, WaitForEvent waits, Join is pending.
pub const FANOUT: &str = "dash_fanout";
/// `Split ⇉ 500 branches → Join → Done`.
pub const WIDE: &str = "dash_wide";
/// Branches of [`WIDE`].
pub const WIDE_BRANCHES: usize = 500;

/// A workflow only the test's runtime registers (not the dashboard's):
/// `First → WaitForEvent → Done`.
pub const HIDDEN: &str = "dash_hidden";

fn hidden_workflow() -> Workflow {
    let first = FnStep::new("First", ["done"], |_| StepOutcome::complete("done"));
    Workflow::builder(HIDDEN)
        .unique("run", Scope::Workflow)
        .start(first.clone())
        .on(first, "done", WaitForEvent)
        .on(WaitForEvent, "received", Done)
        .build()
        .unwrap()
}

fn own_workflows() -> Vec<Workflow> {
    let split = FnStep::new("Split", ["done"], |_| {
        StepOutcome::complete_with("done", json!({"split": true}))
    });
    let work = FnStep::new("Work", ["done"], |_| {
        StepOutcome::complete_with("done", json!({"worked": 42}))
    });
    let join = FnStep::new("Join", ["done"], |_| StepOutcome::complete("done"));
    let fanout = Workflow::builder(FANOUT)
        .unique("order", Scope::Workflow)
        .start(split.clone())
        .fan_out(split, "done", [target(work.clone()), target(WaitForEvent)])
        .on(work, "done", join.clone())
        .on(WaitForEvent, "received", join.clone())
        .on(join, "done", Done)
        .build()
        .unwrap();
    let wide_split = FnStep::new("Split", ["done"], |_| StepOutcome::complete("done"));
    let wide_join = FnStep::new("Join", ["done"], |_| StepOutcome::complete("done"));
    let branches: Vec<FnStep> = (0..WIDE_BRANCHES)
        .map(|i| {
            FnStep::new(&format!("Branch{i:03}"), ["done"], move |_| {
                StepOutcome::complete_with("done", json!({"branch": i}))
            })
        })
        .collect();
    let mut wide = Workflow::builder(WIDE)
        .unique("batch", Scope::Workflow)
        .start(wide_split.clone())
        .fan_out(wide_split, "done", branches.iter().cloned().map(target));
    for branch in branches {
        wide = wide.on(branch, "done", wide_join.clone());
    }
    let wide = wide.on(wide_join, "done", Done).build().unwrap();
    vec![fanout, wide]
}

/// A runtime over `pool` and `schema` with the fixture workflows and the
/// dashboard's own.
pub fn runtime(pool: &PgPool, schema: &TestSchema) -> Runtime<PgBackend> {
    let recorder = fixtures::Recorder::detached();
    let backend = PgBackend::new(
        PgStore::new(pool.clone(), schema.prefix.clone()),
        PgQueue::new(pool.clone(), schema.prefix.clone()),
    );
    let mut builder = Runtime::builder(backend)
        .discard_handler(hephaestus_failure_handler::FailureHandler::new());
    for workflow in fixtures::workflows(&recorder)
        .unwrap()
        .into_iter()
        .chain(own_workflows())
    {
        builder = builder.workflow(workflow);
    }
    builder.build().unwrap()
}

/// A migrated schema and a runtime that starts instances and runs their
/// jobs.
pub struct Env {
    pub schema: TestSchema,
    pub runtime: Runtime<PgBackend>,
}

impl Env {
    pub async fn new() -> Self {
        let schema = TestSchema::new().await;
        hephaestus_storage_pg::migrate(&schema.pool, &schema.prefix)
            .await
            .unwrap();
        hephaestus_queue_pg::migrate(&schema.pool, &schema.prefix)
            .await
            .unwrap();
        // The fixture steps record their executions there.
        let recorder = fixtures::Recorder::new(schema.pool.clone(), &schema.prefix)
            .await
            .unwrap();
        let backend = PgBackend::new(
            PgStore::new(schema.pool.clone(), schema.prefix.clone()),
            PgQueue::new(schema.pool.clone(), schema.prefix.clone()),
        );
        let mut builder = Runtime::builder(backend)
            .discard_handler(hephaestus_failure_handler::FailureHandler::new());
        for workflow in fixtures::workflows(&recorder)
            .unwrap()
            .into_iter()
            .chain(own_workflows())
            .chain([hidden_workflow()])
        {
            builder = builder.workflow(workflow);
        }
        Self {
            runtime: builder.build().unwrap(),
            schema,
        }
    }

    /// A dashboard over this schema with `config` (its own runtime, which
    /// runs no step).
    pub fn dashboard(&self, config: DashboardConfig) -> Dashboard {
        Dashboard::new(runtime(&self.schema.pool, &self.schema), config).unwrap()
    }

    /// A dashboard with actions behind [`TOKEN`].
    pub fn router(&self) -> Router {
        self.dashboard(DashboardConfig::default().with_token(TOKEN))
            .router()
    }

    pub async fn start(&self, workflow: &str, value: &str, input: Value) -> Uuid {
        self.runtime
            .start(workflow, value, input, StartOptions::default())
            .await
            .unwrap()
            .id
    }

    /// Runs every job that is due until none is.
    pub async fn drain(&self) {
        self.runtime.drain().await.unwrap();
    }

    pub async fn instance(&self, id: Uuid) -> Instance {
        self.runtime.get(id).await.unwrap().unwrap()
    }

    pub async fn teardown(self) {
        self.schema.teardown().await;
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn location(&self) -> &str {
        self.headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// Asserts the status, showing the body otherwise.
    #[track_caller]
    pub fn expect(&self, status: StatusCode) -> &Self {
        assert_eq!(self.status, status, "body:\n{}", self.body);
        self
    }

    /// Asserts the body contains `text`.
    #[track_caller]
    pub fn has(&self, text: &str) -> &Self {
        assert!(
            self.body.contains(text),
            "missing {text:?} in:\n{}",
            self.body
        );
        self
    }

    /// Asserts the body does not contain `text`.
    #[track_caller]
    pub fn lacks(&self, text: &str) -> &Self {
        assert!(
            !self.body.contains(text),
            "unexpected {text:?} in:\n{}",
            self.body
        );
        self
    }
}

/// A client of a router: keeps the cookies it is given, sends the bearer
/// token when told to, and fills in the CSRF field from the last page.
pub struct Client {
    router: Router,
    pub bearer: Option<String>,
    cookies: Arc<Mutex<Vec<(String, String)>>>,
    csrf: Arc<Mutex<Option<String>>>,
}

impl Client {
    pub fn new(router: Router) -> Self {
        Self {
            router,
            bearer: Some(TOKEN.to_owned()),
            cookies: Arc::default(),
            csrf: Arc::default(),
        }
    }

    pub fn anonymous(router: Router) -> Self {
        Self {
            bearer: None,
            ..Self::new(router)
        }
    }

    async fn cookie_header(&self) -> String {
        self.cookies
            .lock()
            .await
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub async fn send(&self, request: Request<Body>) -> Reply {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        for cookie in headers.get_all(header::SET_COOKIE) {
            let text = cookie.to_str().unwrap();
            let pair = text.split(';').next().unwrap();
            let (name, value) = pair.split_once('=').unwrap();
            let mut jar = self.cookies.lock().await;
            jar.retain(|(n, _)| n != name);
            if !value.is_empty() {
                jar.push((name.to_owned(), value.to_owned()));
            }
        }
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8(bytes.to_vec()).unwrap();
        if let Some(token) = csrf_of(&body) {
            *self.csrf.lock().await = Some(token);
        }
        Reply {
            status,
            headers,
            body,
        }
    }

    fn request(&self, method: &str, path: &str) -> axum::http::request::Builder {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(token) = &self.bearer {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        request
    }

    pub async fn get(&self, path: &str) -> Reply {
        let request = self
            .request("GET", path)
            .header(header::COOKIE, self.cookie_header().await)
            .body(Body::empty())
            .unwrap();
        self.send(request).await
    }

    /// POSTs `fields` with the CSRF token of the last page fetched.
    pub async fn post(&self, path: &str, fields: &[(&str, &str)]) -> Reply {
        let csrf = self.csrf.lock().await.clone().unwrap_or_default();
        let mut all: Vec<(&str, &str)> = fields.to_vec();
        all.push(("csrf", &csrf));
        self.post_raw(path, &all).await
    }

    /// POSTs exactly `fields`.
    pub async fn post_raw(&self, path: &str, fields: &[(&str, &str)]) -> Reply {
        let body = form_body(fields);
        let request = self
            .request("POST", path)
            .header(header::COOKIE, self.cookie_header().await)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(body))
            .unwrap();
        self.send(request).await
    }
}

/// `a=1&b=2`, percent-encoded.
pub fn form_body(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encodes everything but unreserved characters.
pub fn encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The CSRF field's value in a page.
pub fn csrf_of(body: &str) -> Option<String> {
    let at = body.find(r#"name="csrf" value=""#)?;
    let rest = &body[at + r#"name="csrf" value=""#.len()..];
    Some(rest[..rest.find('"')?].to_owned())
}

/// Waits for `check` to hold, up to `within` (a browser and a server
/// tell nothing but what they show).
pub async fn eventually<F, Fut>(within: Duration, what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    crate::support::wait::until_within(within, what, check).await;
}
