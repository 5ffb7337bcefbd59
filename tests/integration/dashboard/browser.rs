//! The dashboard in a real browser: Debian's headless Chromium, driven
//! through chromedriver (WebDriver, with fantoccini), against a dashboard
//! served on a free port. It signs in, opens the overview, filters the
//! instances, opens one with a fan-out and checks its SVG nodes' states,
//! sees the script refuse a payload that is not JSON, resumes the waiting
//! step through the form and watches the page refresh itself to
//! `completed`, and saves a screenshot under `target/`.
//!
//! Without `chromium` and `chromedriver` the test fails and says what to
//! install (`.ci/run` installs both).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_engine_core::steps::WAIT_FOR_EVENT_ID;
use serde_json::{Map, Value, json};

use super::{Env, FANOUT, TOKEN, eventually};
use crate::faults::fixtures;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

fn require(path: &str) {
    assert!(
        Path::new(path).is_file(),
        "{path} is missing: the dashboard's browser test needs Debian's Chromium and its WebDriver: \
         run `apt-get install -y chromium chromium-driver` (.ci/run does it when they are missing)"
    );
}

/// A chromedriver process on a free port, killed when dropped.
struct Driver {
    _child: tokio::process::Child,
    url: String,
}

async fn free_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

async fn start_driver() -> Driver {
    let port = free_port().await;
    let child = tokio::process::Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}"));
    eventually(
        Duration::from_secs(30),
        "chromedriver to listen",
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
    )
    .await;
    Driver {
        _child: child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

async fn browser(driver: &Driver, profile: &Path) -> Client {
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect::<Vec<_>>();
    let mut capabilities = Map::new();
    capabilities.insert("browserName".into(), json!("chrome"));
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({"binary": CHROMIUM, "args": args}),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .unwrap_or_else(|e| panic!("cannot start a Chromium session through chromedriver: {e}"))
}

async fn attr(client: &Client, css: &str, name: &str) -> Option<String> {
    client
        .find(Locator::Css(css))
        .await
        .unwrap()
        .attr(name)
        .await
        .unwrap()
}

async fn text(client: &Client, css: &str) -> String {
    client
        .find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| crate::support::repo_root().join("target"), PathBuf::from)
}

#[tokio::test]
async fn a_browser_filters_opens_a_fan_out_and_resumes_it_to_completion() {
    require(CHROMIUM);
    require(CHROMEDRIVER);
    let env = Env::new().await;
    let fan = env.start(FANOUT, "browser1", json!({"order": 1})).await;
    let done = env.start(fixtures::LINEAR, "browser2", json!({})).await;
    let failed = env
        .start(fixtures::LINEAR, "browser3", json!({"fatal": "Store"}))
        .await;
    env.drain().await;
    assert_eq!(env.instance(fan).await.status, InstanceStatus::Waiting);

    // The dashboard on a free port, refreshing quickly.
    let dashboard = env.dashboard(
        hephaestus_dashboard::DashboardConfig::default()
            .with_token(TOKEN)
            .with_refresh(Duration::from_millis(300)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, dashboard.router()).await });

    let profile = target_dir().join(format!(
        "dashboard-chromium-{}",
        crate::support::db::unique_suffix()
    ));
    std::fs::create_dir_all(&profile).unwrap();
    let driver = start_driver().await;
    let client = browser(&driver, &profile).await;

    // Sign in.
    client.goto(&format!("{base}/")).await.unwrap();
    client
        .find(Locator::Css("input[name=token]"))
        .await
        .unwrap()
        .send_keys(TOKEN)
        .await
        .unwrap();
    client
        .find(Locator::Css("section.login button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    client
        .wait()
        .for_element(Locator::Css("section.cards"))
        .await
        .unwrap();
    assert_eq!(text(&client, "main h1").await, "Overview");
    assert_eq!(
        text(&client, r#"a.card[data-status="waiting"] .count"#).await,
        "1"
    );
    std::fs::write(
        target_dir().join("dashboard-overview.png"),
        client.screenshot().await.unwrap(),
    )
    .unwrap();
    // A 500-way fan-out's definition: its layer wraps into rows.
    client
        .goto(&format!("{base}/workflows/{}", super::WIDE))
        .await
        .unwrap();
    let nodes = client
        .find_all(Locator::Css("svg.dag g.node"))
        .await
        .unwrap();
    assert_eq!(nodes.len(), super::WIDE_BRANCHES + 3);
    std::fs::write(
        target_dir().join("dashboard-wide.png"),
        client.screenshot().await.unwrap(),
    )
    .unwrap();

    // Filter the instances by workflow.
    client.goto(&format!("{base}/instances")).await.unwrap();
    let rows = client
        .find_all(Locator::Css("table.instances tbody tr"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    std::fs::write(
        target_dir().join("dashboard-instances.png"),
        client.screenshot().await.unwrap(),
    )
    .unwrap();
    client
        .find(Locator::Css("form.filters input[name=workflow]"))
        .await
        .unwrap()
        .send_keys(FANOUT)
        .await
        .unwrap();
    client
        .find(Locator::Css("form.filters button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    client
        .wait()
        .for_url(
            &format!("{base}/instances?workflow={FANOUT}&status=&business_id=&since=&until=")
                .parse()
                .unwrap(),
        )
        .await
        .unwrap();
    let rows = client
        .find_all(Locator::Css("table.instances tbody tr"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "only the fan-out instance");
    assert_eq!(
        rows[0].attr("data-id").await.unwrap(),
        Some(fan.to_string())
    );
    let _ = done;

    // Open it: the SVG has its nodes in the right states.
    client
        .find(Locator::Css(&format!(r#"a[href="/instances/{fan}"]"#)))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    client
        .wait()
        .for_element(Locator::Css("svg.dag"))
        .await
        .unwrap();
    for (step, state) in [
        ("Split", "done"),
        ("Work", "done"),
        (WAIT_FOR_EVENT_ID, "waiting"),
        ("Join", "pending"),
        ("hephaestus::Done", "pending"),
    ] {
        assert_eq!(
            attr(
                &client,
                &format!(r#"svg.dag g.node[data-step="{step}"]"#),
                "data-state"
            )
            .await,
            Some(state.to_owned()),
            "{step}"
        );
    }
    // Clicking a node shows its details.
    client
        .find(Locator::Css(r#"svg.dag g.node[data-step="Work"]"#))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let work = client
        .find(Locator::Css(r#".step-detail[data-step="Work"]"#))
        .await
        .unwrap();
    assert!(work.is_displayed().await.unwrap());
    assert!(
        work.text().await.unwrap().contains("worked: 42"),
        "{}",
        work.text().await.unwrap()
    );
    client
        .find(Locator::Css(&format!(
            r#"svg.dag g.node[data-step="{WAIT_FOR_EVENT_ID}"]"#
        )))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let form_css = format!(r#"form.resume[data-step="{WAIT_FOR_EVENT_ID}"]"#);
    let form = client.find(Locator::Css(&form_css)).await.unwrap();
    assert!(form.is_displayed().await.unwrap());
    assert!(!work.is_displayed().await.unwrap());
    let shot = client.screenshot().await.unwrap();
    std::fs::write(target_dir().join("dashboard-instance.png"), &shot).unwrap();

    // A payload that is not JSON is refused by the page's script.
    let payload = form
        .find(Locator::Css("textarea[name=payload]"))
        .await
        .unwrap();
    payload.send_keys("{not json").await.unwrap();
    form.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let message = form.find(Locator::Css(".json-error")).await.unwrap();
    assert!(message.is_displayed().await.unwrap());
    assert!(message.text().await.unwrap().contains("not valid JSON"));
    assert_eq!(env.instance(fan).await.status, InstanceStatus::Waiting);

    // A valid one resumes the step; a worker runs the rest; the page
    // refreshes itself to `completed`.
    payload.clear().await.unwrap();
    payload.send_keys(r#"{"approved": true}"#).await.unwrap();
    form.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // The form's POST records the resume; a worker (this test's drain)
    // applies it and runs the rest.
    eventually(Duration::from_secs(30), "the instance to complete", || {
        let env = &env;
        async move {
            env.drain().await;
            env.instance(fan).await.status == InstanceStatus::Completed
        }
    })
    .await;
    eventually(Duration::from_secs(30), "the page to show completed", || {
        let client = &client;
        async move {
            matches!(
                client
                    .execute(
                        "const head = document.querySelector('section.instance-head'); return head && head.getAttribute('data-status');",
                        vec![],
                    )
                    .await,
                Ok(Value::String(s)) if s == "completed"
            )
        }
    })
    .await;
    assert_eq!(
        attr(&client, r#"svg.dag g.node[data-step="Join"]"#, "data-state").await,
        Some("done".to_owned())
    );
    assert_eq!(
        attr(&client, "main", "data-refresh-ms").await,
        None,
        "a finished instance stops refreshing"
    );
    let shot = client.screenshot().await.unwrap();
    let path = target_dir().join("dashboard-e2e.png");
    std::fs::write(&path, &shot).unwrap();
    assert!(
        shot.starts_with(b"\x89PNG"),
        "a PNG screenshot at {}",
        path.display()
    );

    // A failed instance: its failure record and the failed node.
    client
        .goto(&format!("{base}/instances/{failed}"))
        .await
        .unwrap();
    assert_eq!(
        attr(
            &client,
            r#"svg.dag g.node[data-step="Store"]"#,
            "data-state"
        )
        .await,
        Some("failed".to_owned())
    );
    assert!(
        text(&client, "section.failure")
            .await
            .contains("Store: scripted fatal failure")
    );
    std::fs::write(
        target_dir().join("dashboard-failed.png"),
        client.screenshot().await.unwrap(),
    )
    .unwrap();

    client.close().await.unwrap();
    drop(driver);
    server.abort();
    let _ = std::fs::remove_dir_all(&profile);
    env.teardown().await;
}
