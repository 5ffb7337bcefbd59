//! `hephaestus dashboard`: the stock binary serves the dashboard over its
//! fixture workflows, read-only or behind a token file, and refuses a setup
//! that would serve actions to anyone.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use super::{Env, TOKEN};
use crate::faults::{fixtures, hephaestus_bin};
use crate::support::db::database_url;

/// A running `hephaestus dashboard`, killed when dropped.
struct Served {
    child: tokio::process::Child,
    address: String,
}

async fn serve(schema: &str, args: &[&str]) -> Served {
    let mut child = tokio::process::Command::new(hephaestus_bin())
        .arg("dashboard")
        .args(["--listen", "127.0.0.1:0", "--schema", schema])
        .args(args)
        .env("DATABASE_URL", database_url())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(60),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .expect("the dashboard says where it listens")
    .unwrap();
    let address = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .trim_end_matches('/')
        .to_owned();
    Served { child, address }
}

/// A plain HTTP/1.0 GET: the status code and the whole response.
async fn get(address: &str, path: &str, bearer: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n{auth}\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    (status, response)
}

#[tokio::test]
async fn hephaestus_dashboard_serves_read_only_or_behind_a_token_and_refuses_bad_setups() {
    let env = Env::new().await;
    let id = env.start(fixtures::WAIT, "cli1", json!({})).await;
    env.drain().await;
    let schema = env.schema.prefix.as_str().to_owned();

    let mut served = serve(&schema, &["--read-only"]).await;
    let (status, page) = get(&served.address, &format!("/instances/{id}"), None).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains(r#"data-state="waiting""#), "{page}");
    assert!(page.contains("read-only"), "{page}");
    let (status, _) = get(&served.address, "/assets/app.css", None).await;
    assert_eq!(status, 200);
    served.child.kill().await.unwrap();

    let dir = std::env::temp_dir().join(format!(
        "hephaestus-dash-{}",
        crate::support::db::unique_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut served = serve(&schema, &["--token-file", token_file.to_str().unwrap()]).await;
    let (status, page) = get(&served.address, "/", None).await;
    assert_eq!(status, 401, "{page}");
    let (status, page) = get(&served.address, &format!("/instances/{id}"), Some(TOKEN)).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("/resume"), "actions are served: {page}");
    served.child.kill().await.unwrap();

    let no_token = refuse(&schema, &[]).await;
    assert!(
        no_token.contains("need a token: give --token-file FILE"),
        "{no_token}"
    );
    let empty = dir.join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let empty_token = refuse(&schema, &["--token-file", empty.to_str().unwrap()]).await;
    assert!(empty_token.contains("is empty"), "{empty_token}");
    let missing = refuse(&schema, &["--token-file", "/nonexistent/hephaestus-token"]).await;
    assert!(
        missing.contains("reading the token file /nonexistent/hephaestus-token"),
        "{missing}"
    );
    let bad_schema = refuse("Bad-Schema", &["--read-only"]).await;
    assert!(bad_schema.contains("invalid --schema"), "{bad_schema}");
    std::fs::remove_dir_all(&dir).unwrap();
    env.teardown().await;
}

/// Runs `hephaestus dashboard` expecting it to refuse to start; its stderr.
async fn refuse(schema: &str, args: &[&str]) -> String {
    let output = tokio::process::Command::new(hephaestus_bin())
        .arg("dashboard")
        .args(["--listen", "127.0.0.1:0", "--schema", schema])
        .args(args)
        .env("DATABASE_URL", database_url())
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}
