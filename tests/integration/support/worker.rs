//! `hephaestus worker` processes for the tests that run real workers:
//! [`Worker`] (`worker_ops`, `pgbouncer`) and [`KillableWorker`] (the chaos
//! test and the SQLite crash test).

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use super::bin::hephaestus_bin;
use super::db::database_url;

/// A `hephaestus worker` process: its stdout lines are read up to "ready";
/// its stderr is collected in the background.
pub struct Worker {
    child: Child,
    stdout: std::io::Lines<BufReader<std::process::ChildStdout>>,
    stderr: Arc<Mutex<String>>,
    /// Its worker id (from the ready line).
    pub id: String,
}

impl Worker {
    /// `hephaestus worker --schema SCHEMA EXTRA..` on the test database;
    /// returns once it printed its ready line.
    pub fn spawn(schema: &str, extra: &[&str]) -> Self {
        Self::spawn_on(database_url(), schema, extra)
    }

    /// [`Worker::spawn`] with `DATABASE_URL=url`.
    pub fn spawn_on(url: &str, schema: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(hephaestus_bin())
            .args(["worker", "--schema", schema])
            .args(extra)
            .env("DATABASE_URL", url)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the worker starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let collected = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0_u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                collected
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = match stdout.next() {
            Some(Ok(line)) => line,
            other => {
                let status = child.wait().unwrap();
                panic!(
                    "no ready line ({other:?}, {status}); stderr: {}",
                    stderr.lock().unwrap()
                )
            }
        };
        assert!(ready.starts_with("hephaestus worker ready"), "{ready}");
        let id = ready
            .split(", ")
            .find_map(|part| part.strip_prefix("worker "))
            .expect("the ready line names the worker")
            .to_owned();
        Self {
            child,
            stdout,
            stderr,
            id,
        }
    }

    /// Sends `kill -SIGNAL` to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal} {pid}");
    }

    /// What it wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the process to end: its remaining stdout lines and whether
    /// it exited 0.
    pub fn wait(mut self) -> (Vec<String>, bool, String) {
        let rest: Vec<String> = self.stdout.by_ref().map(Result::unwrap).collect();
        let status = self.child.wait().unwrap();
        // The collector thread ends with the pipe; give it the last bytes.
        let stderr = self.stderr();
        (rest, status.success(), stderr)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A failed assertion must not leave a worker running (or stopped).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A worker process the crash tests start, SIGKILL and start again, over
/// and over: started with `--exit-on-stdin-close` among its arguments, it
/// stops gracefully when its stdin closes ([`KillableWorker::stop`]). Its
/// stdout is drained in the background so it never blocks on a full pipe;
/// its stderr goes to the test's.
#[derive(Debug)]
pub struct KillableWorker {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
}

impl KillableWorker {
    /// Starts `bin` with `args` and `envs` and waits (at most 30 s) for its
    /// ready line.
    pub fn spawn(
        bin: &std::path::Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Self, String> {
        let mut child = Command::new(bin)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stdin = child.stdin.take();
        let (ready, on_ready) = std::sync::mpsc::channel();
        // Reads every line, so the worker never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("hephaestus worker ready") {
                    let _ = ready.send(());
                }
            }
        });
        let mut worker = Self { child, stdin };
        match on_ready.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(()) => Ok(worker),
            Err(e) => {
                worker.kill();
                Err(format!("the worker did not get ready: {e:?}"))
            }
        }
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Closes stdin (a graceful stop) and waits for the exit; SIGKILLs it
    /// after `within`.
    pub fn stop(mut self, within: std::time::Duration) -> Result<std::process::ExitStatus, String> {
        drop(self.stdin.take());
        // Not reaped before `wait` returns, so the pid stays this child's.
        let pid = self.child.id().to_string();
        let child = &mut self.child;
        std::thread::scope(|scope| {
            let (exited, on_exit) = std::sync::mpsc::channel();
            scope.spawn(move || {
                let _ = exited.send(child.wait());
            });
            if let Ok(status) = on_exit.recv_timeout(within) {
                return status.map_err(|e| e.to_string());
            }
            // The waiting thread holds the child: SIGKILL it by its pid,
            // which ends that wait.
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            Err(format!(
                "did not exit within {within:?} of its stdin closing"
            ))
        })
    }
}

impl Drop for KillableWorker {
    fn drop(&mut self) {
        // No orphan workers when the test fails.
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}
