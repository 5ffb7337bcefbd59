//! The dashboard's handlers through its router (tower `oneshot`), against
//! PostgreSQL.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use hephaestus_dashboard::{Dashboard, DashboardConfig, Error};
use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_engine_core::steps::WAIT_FOR_EVENT_ID;
use hephaestus_queue_pg::{JobFilter, PgQueue};
use hephaestus_runner::Runtime;
use hephaestus_runner::postgres::PgBackend;
use hephaestus_storage_pg::PgStore;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

use super::{Client, Env, FANOUT, TOKEN, WIDE, WIDE_BRANCHES, encode};
use crate::faults::fixtures;

/// The status and business id of an instance row in the instances page.
fn row(id: Uuid, status: &str) -> String {
    format!(r#"data-id="{id}" data-status="{status}""#)
}

fn node(step: &str, state: &str) -> String {
    format!(r#"data-step="{step}" data-state="{state}""#)
}

#[tokio::test]
async fn views_show_counts_instances_dags_jobs_and_workflows() {
    let env = Env::new().await;
    let done = env.start(fixtures::LINEAR, "done1", json!({})).await;
    let failed = env
        .start(fixtures::LINEAR, "failed1", json!({"fatal": "Store"}))
        .await;
    let fan = env.start(FANOUT, "fan1", json!({"order": 7})).await;
    env.drain().await;
    assert_eq!(env.instance(done).await.status, InstanceStatus::Completed);
    assert_eq!(env.instance(failed).await.status, InstanceStatus::Failed);
    assert_eq!(env.instance(fan).await.status, InstanceStatus::Waiting);
    // A job waiting in a queue no worker serves.
    let queue = PgQueue::new(env.schema.pool.clone(), env.schema.prefix.clone());
    let report = queue
        .insert(&hephaestus_engine_core::ports::NewJob::new(
            "reports.daily",
            "reports",
            json!({"day": "2026-12-01"}),
        ))
        .await
        .unwrap()
        .id();
    let client = Client::new(env.router());

    // Overview: counts by status and workflow, queues (with the oldest
    // waiting job), throughput, failures.
    let overview = client.get("/").await;
    overview
        .expect(StatusCode::OK)
        .has(r#"data-status="failed"><span class="count">1</span>"#)
        .has(r#"data-status="completed"><span class="count">1</span>"#)
        .has(r#"data-status="waiting"><span class="count">1</span>"#)
        .has("fixture_linear</a> v1")
        .has("dash_fanout</a> v1")
        .has("Jobs finished per minute, last hour")
        .has(r#"<rect class="bar completed""#)
        .has(&format!(r#"href="/instances/{failed}""#))
        .has("Store: scripted fatal failure")
        .has(&format!(
            r#"<a href="/jobs/{}">#{} reports.daily</a> due "#,
            report.0, report.0
        ))
        .has(r#"href="/jobs?queue=reports&amp;state=available">1</a>"#);
    assert!(
        !overview
            .body
            .contains(&format!(r#"href="/instances/{done}""#)),
        "a completed instance is not a recent failure"
    );

    // Instances: filters, search, keyset paging.
    let all = client.get("/instances").await;
    all.expect(StatusCode::OK);
    for (id, status) in [(done, "completed"), (failed, "failed"), (fan, "waiting")] {
        all.has(&row(id, status));
    }
    let linear = client.get("/instances?workflow=fixture_linear").await;
    linear
        .expect(StatusCode::OK)
        .has(&row(done, "completed"))
        .lacks(&fan.to_string());
    let failures = client.get("/instances?status=failed").await;
    failures
        .has(&row(failed, "failed"))
        .lacks(&row(done, "completed"));
    let two = client
        .get("/instances?status=failed&status=completed")
        .await;
    two.has(&row(failed, "failed"))
        .has(&row(done, "completed"))
        .lacks(&fan.to_string());
    let fan_business = env.instance(fan).await.business_id.to_string();
    let by_business = client
        .get(&format!("/instances?business_id={}", encode(&fan_business)))
        .await;
    by_business
        .has(&row(fan, "waiting"))
        .lacks(&done.to_string());
    let searched = client
        .get(&format!("/instances?q={}", encode(&fan_business)))
        .await;
    searched.has(&row(fan, "waiting")).lacks(&done.to_string());
    let jump = client.get(&format!("/instances?q={fan}")).await;
    jump.expect(StatusCode::SEE_OTHER);
    assert_eq!(jump.location(), format!("/instances/{fan}"));
    let future = client.get("/instances?since=2999-01-01T00:00:00Z").await;
    future.expect(StatusCode::OK).has("No instances match.");
    let past = client.get("/instances?until=2000-01-01T00:00").await;
    past.has("No instances match.");
    // Newest first, one per page: fan, failed, done.
    let first = client.get("/instances?limit=1").await;
    first.has(&row(fan, "waiting")).lacks(&failed.to_string());
    let next = format!("/instances?limit=1&amp;after={fan}");
    first.has(&next);
    let second = client.get(&format!("/instances?limit=1&after={fan}")).await;
    second
        .has(&row(failed, "failed"))
        .lacks(&row(fan, "waiting"));
    let last = client
        .get(&format!("/instances?limit=1&after={failed}"))
        .await;
    last.has(&row(done, "completed")).has("No more.");

    // An instance with a fan-out: the DAG with each step's state.
    let page = client.get(&format!("/instances/{fan}")).await;
    page.expect(StatusCode::OK)
        .has(&node("Split", "done"))
        .has(&node("Work", "done"))
        .has(&node(WAIT_FOR_EVENT_ID, "waiting"))
        .has(&node("Join", "pending"))
        .has(&node("hephaestus::Done", "pending"))
        .has(r#"class="edge taken" data-from="Split" data-to="Work""#)
        .has(r#"class="edge" data-from="Join" data-to="hephaestus::Done""#)
        // It is active: it refreshes itself.
        .has(r#"<main id="main" data-refresh-ms="2000">"#)
        // Step details: output, timing, and the resume form of the waiting step.
        .has(r#"<span class="json-key">worked</span>: <span class="json-number">42</span>"#)
        .has("<dt>Took</dt>")
        .has(&format!(
            r#"action="/instances/{fan}/resume" data-step="{WAIT_FOR_EVENT_ID}""#
        ))
        .has(r#"<option value="received">received</option>"#)
        // The context: the input.
        .has(r#"<span class="json-key">order</span>: <span class="json-number">7</span>"#)
        // Jobs and history.
        .has("hephaestus.execute")
        .has("completed with :done")
        .has("went async")
        .has("Cancel instance");

    // A failed instance: the failure record, the failed node, retry.
    let page = client.get(&format!("/instances/{failed}")).await;
    page.expect(StatusCode::OK)
        .has(r#"<section class="failure">"#)
        .has("Store: scripted fatal failure")
        .has(&node("Store", "failed"))
        .has(&node("Fetch", "done"))
        .has("Retry from the failed step")
        .lacks("data-refresh-ms")
        .lacks("Cancel instance");

    // A completed one: no refresh, no action.
    let page = client.get(&format!("/instances/{done}")).await;
    page.has(&node("Store", "done"))
        .has("instance completed")
        .lacks("data-refresh-ms")
        .lacks("Retry from the failed step");

    // Workflows: each registered version with counts; one with its DAG.
    let workflows = client.get("/workflows").await;
    workflows
        .expect(StatusCode::OK)
        .has(r#"href="/workflows/fixture_diamond?version=1""#)
        .has(r#"href="/workflows/dash_wide?version=1""#);
    let wf = client.get("/workflows/dash_fanout").await;
    wf.expect(StatusCode::OK)
        .has(r#"data-step="Split" data-state="definition""#)
        .has(r#"action="/workflows/dash_fanout/start""#)
        .has("/instances?workflow=dash_fanout&amp;status=waiting");

    // Jobs: by queue and state, and one job.
    let jobs = client.get("/jobs").await;
    jobs.expect(StatusCode::OK)
        .has("Recent errors")
        .has("hephaestus.execute");
    let job = queue
        .jobs(&JobFilter::default().with_group(hephaestus_runner::jobs::group(failed)))
        .await
        .unwrap()
        .into_iter()
        .find(|j| !j.errors.is_empty())
        .expect("the failed step's job recorded its error");
    let page = client.get(&format!("/jobs/{}", job.id.0)).await;
    page.expect(StatusCode::OK)
        .has("<h2>Args</h2>")
        .has("<h2>Meta</h2>")
        .has("Store: scripted fatal failure")
        .has(&format!(r#"href="/instances/{failed}""#));
    let filtered = client
        .get(&format!("/jobs?state={}", job.state.as_str()))
        .await;
    filtered.has(&format!(r#"href="/jobs/{}""#, job.id.0));
    env.teardown().await;
}

#[tokio::test]
async fn an_unregistered_workflow_is_drawn_from_its_stored_step_states() {
    let env = Env::new().await;
    let id = env.start(super::HIDDEN, "h1", json!({})).await;
    env.drain().await;
    let client = Client::new(env.router());
    let page = client.get(&format!("/instances/{id}")).await;
    page.expect(StatusCode::OK)
        .has("drawn from the stored step states")
        .has(&node("First", "done"))
        .has(&node("hephaestus::WaitForEvent", "waiting"))
        .has("Resuming needs the definition of this workflow");
    // Not registered here: steering it is the runner's typed error.
    let refused = client.post(&format!("/instances/{id}/cancel"), &[]).await;
    refused
        .expect(StatusCode::NOT_FOUND)
        .has("is not registered");
    let workflows = client.get("/workflows").await;
    workflows
        .has("Instances of workflows this dashboard does not register")
        .has(super::HIDDEN);
    env.teardown().await;
}

#[tokio::test]
async fn actions_resume_cancel_retry_and_start_through_the_runner() {
    let env = Env::new().await;
    let fan = env.start(FANOUT, "act1", json!({})).await;
    let wait = env.start(fixtures::WAIT, "act2", json!({})).await;
    let failed = env
        .start(fixtures::LINEAR, "act3", json!({"fatal": "Store"}))
        .await;
    env.drain().await;
    let client = Client::new(env.router());
    client
        .get(&format!("/instances/{fan}"))
        .await
        .expect(StatusCode::OK);
    let resume = format!("/instances/{fan}/resume");

    // Resume: the event is checked against the step, the payload is JSON.
    let undeclared = client
        .post(
            &resume,
            &[("step", WAIT_FOR_EVENT_ID), ("event", "shipped")],
        )
        .await;
    undeclared
        .expect(StatusCode::BAD_REQUEST)
        .has("does not declare event :shipped");
    let bad_json = client
        .post(
            &resume,
            &[
                ("step", WAIT_FOR_EVENT_ID),
                ("event", "received"),
                ("payload", "{oops"),
            ],
        )
        .await;
    bad_json
        .expect(StatusCode::BAD_REQUEST)
        .has("payload=")
        .has("not valid JSON");
    let not_waiting = client
        .post(&resume, &[("step", "Work"), ("event", "done")])
        .await;
    not_waiting
        .expect(StatusCode::CONFLICT)
        .has("is not waiting");
    let unknown = client
        .post(&resume, &[("step", "Nope"), ("event", "done")])
        .await;
    unknown
        .expect(StatusCode::BAD_REQUEST)
        .has("Nope is not part of this workflow");
    let resumed = client
        .post(
            &resume,
            &[
                ("step", WAIT_FOR_EVENT_ID),
                ("event", "received"),
                ("payload", r#"{"approved": true}"#),
            ],
        )
        .await;
    resumed.expect(StatusCode::SEE_OTHER);
    assert_eq!(resumed.location(), format!("/instances/{fan}"));
    env.drain().await;
    let instance = env.instance(fan).await;
    assert_eq!(instance.status, InstanceStatus::Completed);
    assert!(
        instance
            .context
            .steps
            .values()
            .any(|v| *v == json!({"approved": true})),
        "{:?}",
        instance.context.steps
    );
    let again = client
        .post(
            &resume,
            &[("step", WAIT_FOR_EVENT_ID), ("event", "received")],
        )
        .await;
    again.expect(StatusCode::CONFLICT);

    // Cancel, with a reason kept in the history; a second cancel is refused.
    let cancelled = client
        .post(
            &format!("/instances/{wait}/cancel"),
            &[("reason", "ops: duplicate order")],
        )
        .await;
    cancelled.expect(StatusCode::SEE_OTHER);
    assert_eq!(env.instance(wait).await.status, InstanceStatus::Cancelled);
    client
        .get(&format!("/instances/{wait}"))
        .await
        .has("cancelled: ops: duplicate order");
    client
        .post(&format!("/instances/{wait}/cancel"), &[])
        .await
        .expect(StatusCode::CONFLICT)
        .has("instance is cancelled");

    // Retry a failed instance: it completes; retrying a completed one is refused.
    client
        .post(&format!("/instances/{failed}/retry"), &[])
        .await
        .expect(StatusCode::SEE_OTHER);
    env.drain().await;
    assert_eq!(env.instance(failed).await.status, InstanceStatus::Completed);
    client
        .post(&format!("/instances/{failed}/retry"), &[])
        .await
        .expect(StatusCode::CONFLICT)
        .has("not failed");

    // Start: a new instance with the JSON input; the business id is unique
    // among active instances.
    let started = client
        .post(
            "/workflows/fixture_wait/start",
            &[
                ("business_value", "new1"),
                ("input", r#"{"from": "dashboard"}"#),
                ("version", "1"),
            ],
        )
        .await;
    started.expect(StatusCode::SEE_OTHER);
    let id: Uuid = started
        .location()
        .strip_prefix("/instances/")
        .unwrap()
        .parse()
        .unwrap();
    let instance = env.instance(id).await;
    assert_eq!(instance.context.initial, json!({"from": "dashboard"}));
    let duplicate = client
        .post(
            "/workflows/fixture_wait/start",
            &[("business_value", "new1")],
        )
        .await;
    duplicate
        .expect(StatusCode::CONFLICT)
        .has(&format!("is already running as instance {id}"));
    client
        .post(
            "/workflows/fixture_wait/start",
            &[("business_value", "new2"), ("input", "[1,")],
        )
        .await
        .expect(StatusCode::BAD_REQUEST)
        .has("input=");
    client
        .post(
            "/workflows/no_such_workflow/start",
            &[("business_value", "x")],
        )
        .await
        .expect(StatusCode::NOT_FOUND);
    client
        .post(&format!("/instances/{}/cancel", Uuid::now_v7()), &[])
        .await
        .expect(StatusCode::NOT_FOUND);
    env.teardown().await;
}

#[tokio::test]
async fn bulk_actions_confirm_the_count_and_refuse_a_changed_selection() {
    let env = Env::new().await;
    let mut waiting = Vec::new();
    for i in 0..3 {
        waiting.push(
            env.start(fixtures::WAIT, &format!("bulk{i}"), json!({}))
                .await,
        );
    }
    let mut failed = Vec::new();
    for i in 0..2 {
        failed.push(
            env.start(
                fixtures::LINEAR,
                &format!("bulkf{i}"),
                json!({"fatal": "Store"}),
            )
            .await,
        );
    }
    let other = env.start(fixtures::LINEAR, "bulkok", json!({})).await;
    env.drain().await;
    let client = Client::new(env.router());

    let instances = client.get("/instances?workflow=fixture_wait").await;
    instances.has("/instances/bulk?action=cancel&amp;workflow=fixture_wait");
    let confirm = client
        .get("/instances/bulk?action=cancel&workflow=fixture_wait")
        .await;
    confirm
        .expect(StatusCode::OK)
        .has(r#"data-count="3""#)
        .has("This will cancel 3 instances.")
        .has(r#"name="expected" value="3""#);
    // Another instance joins the selection: the confirmed count is stale.
    let late = env.start(fixtures::WAIT, "bulklate", json!({})).await;
    let stale = client
        .post(
            "/instances/bulk",
            &[
                ("action", "cancel"),
                ("workflow", "fixture_wait"),
                ("expected", "3"),
            ],
        )
        .await;
    stale
        .expect(StatusCode::CONFLICT)
        .has("4 instances match now, 3 were confirmed");
    for id in &waiting {
        assert_eq!(env.instance(*id).await.status, InstanceStatus::Waiting);
    }
    let done = client
        .post(
            "/instances/bulk",
            &[
                ("action", "cancel"),
                ("workflow", "fixture_wait"),
                ("expected", "4"),
            ],
        )
        .await;
    done.expect(StatusCode::OK)
        .has(r#"data-done="4" data-failed="0""#);
    for id in waiting.iter().chain([&late]) {
        assert_eq!(env.instance(*id).await.status, InstanceStatus::Cancelled);
    }

    // Retry applies to failed instances only, whatever else the filter selects.
    let confirm = client.get("/instances/bulk?action=retry").await;
    confirm.has("This will retry 2 instances.");
    let none = client
        .get("/instances/bulk?action=retry&status=completed")
        .await;
    none.has(r#"data-count="0""#).lacks(r#"name="expected""#);
    client
        .post("/instances/bulk", &[("action", "retry"), ("expected", "2")])
        .await
        .expect(StatusCode::OK)
        .has(r#"data-done="2" data-failed="0""#);
    env.drain().await;
    for id in &failed {
        assert_eq!(env.instance(*id).await.status, InstanceStatus::Completed);
    }
    assert_eq!(env.instance(other).await.status, InstanceStatus::Completed);
    client
        .post("/instances/bulk", &[("action", "retry")])
        .await
        .expect(StatusCode::BAD_REQUEST)
        .has("expected is missing");
    env.teardown().await;
}

/// A POST of a bad-parameter case: the path, the fields, what the page says.
type Post<'a> = (String, Vec<(&'a str, &'a str)>, &'a str);

#[tokio::test]
async fn every_bad_parameter_is_a_400_page_that_says_what_is_wrong() {
    let env = Env::new().await;
    let id = env.start(FANOUT, "bad1", json!({})).await;
    env.drain().await;
    let client = Client::new(env.router());
    let absent = Uuid::now_v7();
    let cases: Vec<(String, StatusCode, &str)> = vec![
        (
            "/?x=1".into(),
            StatusCode::BAD_REQUEST,
            "unknown parameter &quot;x&quot;",
        ),
        (
            "/instances?status=bogus".into(),
            StatusCode::BAD_REQUEST,
            "status=&quot;bogus&quot;",
        ),
        (
            "/instances?business_id=nokey".into(),
            StatusCode::BAD_REQUEST,
            "key::value",
        ),
        (
            "/instances?since=yesterday".into(),
            StatusCode::BAD_REQUEST,
            "since=&quot;yesterday&quot;: not a time",
        ),
        (
            "/instances?since=2026-02-01T00:00:00Z&until=2026-01-01T00:00".into(),
            StatusCode::BAD_REQUEST,
            "is not before until",
        ),
        (
            "/instances?limit=0".into(),
            StatusCode::BAD_REQUEST,
            "limit=&quot;0&quot;: a page size is a whole number from 1 to 500",
        ),
        (
            "/instances?limit=many".into(),
            StatusCode::BAD_REQUEST,
            "a page size",
        ),
        (
            "/instances?limit=1&limit=2".into(),
            StatusCode::BAD_REQUEST,
            "limit is given 2 times",
        ),
        (
            "/instances?after=last".into(),
            StatusCode::BAD_REQUEST,
            "after=&quot;last&quot;: not a UUID",
        ),
        (
            format!("/instances?after={absent}"),
            StatusCode::BAD_REQUEST,
            "no such instance",
        ),
        (
            "/instances?q=%25%27%3B+drop+table".into(),
            StatusCode::BAD_REQUEST,
            "is neither an instance id",
        ),
        (
            "/instances?workflow=%00".into(),
            StatusCode::BAD_REQUEST,
            "workflow=",
        ),
        (
            "/instances/not-a-uuid".into(),
            StatusCode::BAD_REQUEST,
            "is not an instance id",
        ),
        (
            format!("/instances/{id}?tab=x"),
            StatusCode::BAD_REQUEST,
            "unknown parameter",
        ),
        (
            format!("/instances/{absent}"),
            StatusCode::NOT_FOUND,
            "no instance",
        ),
        (
            "/instances/bulk".into(),
            StatusCode::BAD_REQUEST,
            "action is missing",
        ),
        (
            "/instances/bulk?action=explode".into(),
            StatusCode::BAD_REQUEST,
            "the action is cancel or retry",
        ),
        (
            "/jobs?state=sleeping".into(),
            StatusCode::BAD_REQUEST,
            "not a job state",
        ),
        (
            "/jobs?after=-1".into(),
            StatusCode::BAD_REQUEST,
            "a job id is a positive whole number",
        ),
        ("/jobs/abc".into(), StatusCode::BAD_REQUEST, "a job id"),
        (
            "/jobs/999999999".into(),
            StatusCode::NOT_FOUND,
            "no job #999999999",
        ),
        (
            "/workflows/fixture_wait?version=two".into(),
            StatusCode::BAD_REQUEST,
            "a version is a whole number",
        ),
        (
            "/workflows/fixture_wait?version=9".into(),
            StatusCode::NOT_FOUND,
            "has no version 9",
        ),
        (
            "/workflows/nope".into(),
            StatusCode::NOT_FOUND,
            "no workflow",
        ),
        (
            "/no/such/page".into(),
            StatusCode::NOT_FOUND,
            "no page GET /no/such/page",
        ),
        (
            "/instances/%FF%FE".into(),
            StatusCode::BAD_REQUEST,
            "the instance id in the path",
        ),
        (
            format!("/instances/{id}/cancel"),
            StatusCode::METHOD_NOT_ALLOWED,
            "is not served: it is an action: send it with its form (POST)",
        ),
    ];
    for (path, status, says) in &cases {
        let reply = client.get(path).await;
        assert_eq!(reply.status, *status, "{path}: {}", reply.body);
        assert!(
            reply.body.contains(says),
            "{path}: missing {says:?} in\n{}",
            reply.body
        );
        assert!(
            reply.body.contains(r#"<section class="error""#),
            "{path}: not an error page"
        );
    }
    client
        .get(&format!("/instances/{id}"))
        .await
        .expect(StatusCode::OK);
    let posts: Vec<Post<'_>> = vec![
        (
            format!("/instances/{id}/resume"),
            vec![("event", "received")],
            "step is missing",
        ),
        (
            format!("/instances/{id}/resume"),
            vec![("step", "X"), ("event", "y"), ("extra", "1")],
            "unknown parameter &quot;extra&quot;",
        ),
        (
            format!("/instances/{id}/resume"),
            vec![("step", "X"), ("step", "Y"), ("event", "y")],
            "step is given 2 times",
        ),
        (
            "/instances/zzz/cancel".into(),
            vec![],
            "is not an instance id",
        ),
        (
            "/workflows/fixture_wait/start".into(),
            vec![("business_value", "v"), ("version", "two")],
            "a version is a whole number",
        ),
        (
            "/workflows/fixture_wait/start".into(),
            vec![("input", "{}")],
            "business_value is missing",
        ),
        (
            "/instances/bulk".into(),
            vec![("action", "cancel"), ("expected", "many")],
            "expected is the count confirmed",
        ),
        (
            "/instances/bulk".into(),
            vec![("action", "cancel"), ("expected", "1"), ("status", "nope")],
            "status=&quot;nope&quot;",
        ),
    ];
    for (path, fields, says) in &posts {
        let reply = client.post(path, fields).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{path}: {}",
            reply.body
        );
        assert!(
            reply.body.contains(says),
            "{path}: missing {says:?} in\n{}",
            reply.body
        );
    }
    client
        .post("/instances", &[])
        .await
        .expect(StatusCode::METHOD_NOT_ALLOWED)
        .has("POST /instances is not served: it is a page: open it (GET)");
    assert_eq!(env.instance(id).await.status, InstanceStatus::Waiting);
    env.teardown().await;
}

#[tokio::test]
async fn a_read_only_dashboard_serves_no_action() {
    let env = Env::new().await;
    let id = env.start(FANOUT, "ro1", json!({})).await;
    env.drain().await;
    let client = Client::anonymous(
        env.dashboard(DashboardConfig::default().with_read_only(true))
            .router(),
    );
    let overview = client.get("/").await;
    overview
        .expect(StatusCode::OK)
        .has(r#"<span class="badge">read-only</span>"#);
    let page = client.get(&format!("/instances/{id}")).await;
    page.expect(StatusCode::OK)
        .has(&node(WAIT_FOR_EVENT_ID, "waiting"))
        .lacks(r#"method="post""#)
        .lacks("Cancel instance");
    client.get("/instances").await.lacks("Bulk actions");
    client
        .get("/workflows/dash_fanout")
        .await
        .lacks("Start an instance");
    client
        .get("/instances/bulk?action=cancel")
        .await
        .expect(StatusCode::FORBIDDEN)
        .has("read-only");
    for path in [
        format!("/instances/{id}/cancel"),
        format!("/instances/{id}/resume"),
        format!("/instances/{id}/retry"),
        "/workflows/fixture_wait/start".to_owned(),
        "/instances/bulk".to_owned(),
    ] {
        client
            .post(&path, &[("step", WAIT_FOR_EVENT_ID), ("event", "received")])
            .await
            .expect(StatusCode::FORBIDDEN)
            .has("this dashboard is read-only");
    }
    assert_eq!(env.instance(id).await.status, InstanceStatus::Waiting);

    // Read-only with a token: pages need it too.
    let guarded = env
        .dashboard(
            DashboardConfig::default()
                .with_read_only(true)
                .with_token(TOKEN),
        )
        .router();
    Client::anonymous(guarded.clone())
        .get("/")
        .await
        .expect(StatusCode::UNAUTHORIZED);
    Client::new(guarded).get("/").await.expect(StatusCode::OK);

    // Actions without a token are refused when building the dashboard.
    let error = Dashboard::new(
        super::runtime(&env.schema.pool, &env.schema),
        DashboardConfig::default(),
    )
    .unwrap_err();
    assert!(matches!(error, Error::ActionsNeedToken), "{error}");
    let error = Dashboard::new(
        super::runtime(&env.schema.pool, &env.schema),
        DashboardConfig::default().with_token("short"),
    )
    .unwrap_err();
    assert!(matches!(error, Error::BadToken), "{error}");
    let error = Dashboard::new(
        super::runtime(&env.schema.pool, &env.schema),
        DashboardConfig::default()
            .with_read_only(true)
            .with_mount_path("ops/"),
    )
    .unwrap_err();
    assert!(matches!(error, Error::BadMountPath(_)), "{error}");
    env.teardown().await;
}

#[tokio::test]
async fn a_token_guards_every_page_and_a_csrf_token_every_post() {
    let env = Env::new().await;
    let id = env.start(FANOUT, "auth1", json!({})).await;
    env.drain().await;
    let router = env.router();

    // No token, a wrong token, the right one.
    let anonymous = Client::anonymous(router.clone());
    let refused = anonymous.get(&format!("/instances/{id}")).await;
    refused
        .expect(StatusCode::UNAUTHORIZED)
        .has("this dashboard needs its token")
        .has(&format!(r#"name="next" value="/instances/{id}""#))
        .lacks(&id.to_string().replace('-', "_"));
    assert!(refused.headers.contains_key("www-authenticate"));
    assert!(
        !refused.body.contains("data-step"),
        "nothing of the instance is shown"
    );
    anonymous
        .post(&format!("/instances/{id}/cancel"), &[])
        .await
        .expect(StatusCode::UNAUTHORIZED);
    let mut wrong = Client::new(router.clone());
    wrong.bearer = Some("not-the-token-at-all".to_owned());
    wrong
        .get("/")
        .await
        .expect(StatusCode::UNAUTHORIZED)
        .has("the bearer token is wrong");
    Client::new(router.clone())
        .get("/")
        .await
        .expect(StatusCode::OK);
    // The assets need no token (the sign-in page uses them).
    anonymous
        .get("/assets/app.js")
        .await
        .expect(StatusCode::OK)
        .has("showStep");

    // Signing in: a wrong token, then the right one sets the session cookie.
    let browser = Client::anonymous(router.clone());
    browser.get("/login").await.expect(StatusCode::OK);
    browser
        .post("/login", &[("token", "guess-guess-guess-guess")])
        .await
        .expect(StatusCode::UNAUTHORIZED)
        .has("That is not the token.");
    let signed_in = browser
        .post(
            "/login",
            &[("token", TOKEN), ("next", &format!("/instances/{id}"))],
        )
        .await;
    signed_in.expect(StatusCode::SEE_OTHER);
    assert_eq!(signed_in.location(), format!("/instances/{id}"));
    let cookie = signed_in
        .headers
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    browser
        .get(&format!("/instances/{id}"))
        .await
        .expect(StatusCode::OK)
        .has("Sign out");
    // An open redirect is not followed.
    let elsewhere = browser
        .post("/login", &[("token", TOKEN), ("next", "//evil.example/")])
        .await;
    assert_eq!(elsewhere.location(), "/");
    // A forged session cookie is not a session.
    let forged = Client::anonymous(router.clone());
    let request = axum::http::Request::builder()
        .uri("/")
        .header("cookie", "hephaestus_session=99999999999.00ff")
        .body(axum::body::Body::empty())
        .unwrap();
    forged.send(request).await.expect(StatusCode::UNAUTHORIZED);
    // Signing out ends the session.
    browser
        .post("/logout", &[])
        .await
        .expect(StatusCode::SEE_OTHER);
    browser.get("/").await.expect(StatusCode::UNAUTHORIZED);

    // CSRF: a POST without the field, with a wrong one, or with another
    // client's is refused, even with the right bearer token.
    let client = Client::new(router.clone());
    client
        .get(&format!("/instances/{id}"))
        .await
        .expect(StatusCode::OK);
    let cancel = format!("/instances/{id}/cancel");
    client
        .post_raw(&cancel, &[])
        .await
        .expect(StatusCode::FORBIDDEN)
        .has("no valid CSRF token");
    client
        .post_raw(&cancel, &[("csrf", "00ff00ff")])
        .await
        .expect(StatusCode::FORBIDDEN);
    let other = Client::new(router.clone());
    let other_page = other.get(&format!("/instances/{id}")).await;
    let other_token = super::csrf_of(&other_page.body).unwrap();
    client
        .post_raw(&cancel, &[("csrf", &other_token)])
        .await
        .expect(StatusCode::FORBIDDEN);
    Client::anonymous(router.clone())
        .post_raw("/login", &[("token", TOKEN)])
        .await
        .expect(StatusCode::FORBIDDEN);
    assert_eq!(env.instance(id).await.status, InstanceStatus::Waiting);
    client
        .post(&cancel, &[])
        .await
        .expect(StatusCode::SEE_OTHER);
    assert_eq!(env.instance(id).await.status, InstanceStatus::Cancelled);
    env.teardown().await;
}

/// A TCP proxy in front of PostgreSQL that can be cut (every connection
/// dropped, new ones closed at once) and restored.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    generation: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let (generation, watch) = tokio::sync::watch::channel(0_u64);
        let accepting = Arc::clone(&up);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let mut cut = watch.clone();
                // Only cuts from now on end this connection.
                cut.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self {
            port,
            up,
            generation,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_database_that_goes_away_is_a_503_page_and_the_dashboard_recovers() {
    let env = Env::new().await;
    let id = env.start(FANOUT, "down1", json!({})).await;
    env.drain().await;
    let options: sqlx::postgres::PgConnectOptions =
        crate::support::db::database_url().parse().unwrap();
    let proxy = Proxy::start(format!("{}:{}", options.get_host(), options.get_port())).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with(options.clone().host("127.0.0.1").port(proxy.port))
        .await
        .unwrap();
    let backend = PgBackend::new(
        PgStore::new(pool.clone(), env.schema.prefix.clone()),
        PgQueue::new(pool.clone(), env.schema.prefix.clone()),
    );
    let runtime = Runtime::builder(backend)
        .discard_handler(hephaestus_failure_handler::FailureHandler::new())
        .build()
        .unwrap();
    let dashboard = Dashboard::new(runtime, DashboardConfig::default().with_token(TOKEN)).unwrap();
    let client = Client::new(dashboard.router());
    client
        .get(&format!("/instances/{id}"))
        .await
        .expect(StatusCode::OK);

    proxy.cut();
    for path in [
        "/".to_owned(),
        format!("/instances/{id}"),
        "/instances".to_owned(),
        "/jobs".to_owned(),
    ] {
        let down = client.get(&path).await;
        down.expect(StatusCode::SERVICE_UNAVAILABLE)
            .has("Database unavailable")
            .has("The database cannot be reached")
            .has("reconnects by itself");
    }
    client
        .post(&format!("/instances/{id}/cancel"), &[])
        .await
        .expect(StatusCode::SERVICE_UNAVAILABLE);

    proxy.restore();
    super::eventually(Duration::from_secs(20), "the dashboard to recover", || {
        let client = &client;
        let path = format!("/instances/{id}");
        async move { client.get(&path).await.status == StatusCode::OK }
    })
    .await;
    client.get("/").await.expect(StatusCode::OK);
    assert_eq!(env.instance(id).await.status, InstanceStatus::Waiting);
    pool.close().await;
    env.teardown().await;
}

/// Runs an instance of `WIDE` to its end with the pure engine, every step
/// completing with its one event and a small output, and stores it: the
/// same instance the runner would produce, without running 500 jobs (which
/// takes minutes in a debug build).
async fn wide_instance(env: &Env, input: serde_json::Value) -> Uuid {
    use hephaestus_engine_core::ports::{InstanceStore as _, UnitOfWork as _};
    use hephaestus_engine_core::{BusinessId, Completion, Engine, Input, NewInstance, StepId};

    let workflow = env.runtime.registry().get(WIDE, 1).unwrap().clone();
    let engine = Engine::new(&workflow);
    let now = chrono::Utc::now();
    let mut instance = engine
        .new_instance(NewInstance {
            id: Uuid::now_v7(),
            business_id: BusinessId::parse("batch::wide1").unwrap(),
            input,
            telemetry_metadata: serde_json::Map::new(),
            now,
        })
        .unwrap();
    let started = engine.apply(&mut instance, Input::Start, now).unwrap();
    let mut pending: Vec<(StepId, u32)> =
        started.executions().map(|(s, a)| (s.clone(), a)).collect();
    while let Some((step, activation)) = pending.pop() {
        let event = workflow.step(step.as_str()).unwrap().events[0].to_string();
        let applied = engine
            .apply(
                &mut instance,
                Input::Completed {
                    completion: Completion::new(event)
                        .with_output(json!({"step": step.as_str(), "ok": true})),
                    step,
                    activation,
                },
                now,
            )
            .unwrap();
        pending.extend(applied.executions().map(|(s, a)| (s.clone(), a)));
    }
    assert_eq!(instance.status, InstanceStatus::Completed);
    let store = PgStore::new(env.schema.pool.clone(), env.schema.prefix.clone());
    let mut tx = store.begin().await.unwrap();
    store.insert(&mut tx, &instance).await.unwrap();
    store.commit(tx).await.unwrap();
    instance.id
}

#[tokio::test]
async fn a_500_way_fan_out_with_a_1_mb_context_renders_in_well_under_a_second() {
    let env = Env::new().await;
    let blob = "x".repeat(1_000_000);
    let id = wide_instance(
        &env,
        json!({"blob": blob, "items": (0..2_000).collect::<Vec<_>>()}),
    )
    .await;
    let instance = env.instance(id).await;
    assert_eq!(instance.status, InstanceStatus::Completed);
    assert_eq!(instance.steps.len(), WIDE_BRANCHES + 3);
    assert!(serde_json::to_string(&instance.context).unwrap().len() > 1_000_000);
    let client = Client::new(env.router());
    // Warm up the pool and the caches, then time the page.
    client
        .get(&format!("/instances/{id}"))
        .await
        .expect(StatusCode::OK);
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..5 {
        let began = Instant::now();
        let page = client.get(&format!("/instances/{id}")).await;
        times.push(began.elapsed());
        page.expect(StatusCode::OK);
        size = page.body.len();
        assert_eq!(
            page.body.matches(r#"data-state="done""#).count(),
            WIDE_BRANCHES + 3
        );
        assert!(
            page.body
                .contains(r#"data-step="Branch499" data-state="done""#)
        );
    }
    times.sort();
    let median = times[times.len() / 2];
    println!(
        "dashboard: instance page of a {WIDE_BRANCHES}-way fan-out with a 1 MB context: median {:.1} ms of {} renders (min {:.1} ms, max {:.1} ms), {} KB of HTML",
        median.as_secs_f64() * 1e3,
        times.len(),
        times[0].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
        size / 1024
    );
    assert!(median < Duration::from_secs(1), "median {median:?}");
    env.teardown().await;
}

#[tokio::test]
async fn mounted_under_a_path_every_link_and_cookie_carries_it() {
    let env = Env::new().await;
    let id = env.start(FANOUT, "mount1", json!({})).await;
    env.drain().await;
    let dashboard = env.dashboard(
        DashboardConfig::default()
            .with_mount_path("/ops/heph")
            .with_token(TOKEN),
    );
    let app = axum::Router::new()
        .route("/health", axum::routing::get(|| async { "ok" }))
        .merge(dashboard.router());
    let client = Client::new(app);
    let overview = client.get("/ops/heph").await;
    overview
        .expect(StatusCode::OK)
        .has(r#"href="/ops/heph/instances""#)
        .has(r#"src="/ops/heph/assets/app.js"#);
    let cookie = overview
        .headers
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(cookie.contains("Path=/ops/heph"), "{cookie}");
    client
        .get(&format!("/ops/heph/instances/{id}"))
        .await
        .expect(StatusCode::OK)
        .has(&format!(r#"action="/ops/heph/instances/{id}/resume""#));
    let moved = client
        .post(
            &format!("/ops/heph/instances/{id}/resume"),
            &[("step", WAIT_FOR_EVENT_ID), ("event", "received")],
        )
        .await;
    moved.expect(StatusCode::SEE_OTHER);
    assert_eq!(moved.location(), format!("/ops/heph/instances/{id}"));
    client.get("/health").await.expect(StatusCode::OK);
    env.teardown().await;
}
