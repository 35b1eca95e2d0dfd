//! Test harness: a real Azurite, the Compute simulator and the handler binary on free ports,
//! driven the way the Functions host drives the handler.
#![allow(dead_code)]

pub mod attested;
pub mod azurite;
pub mod sockets;
pub mod webhook;

use azurite::{free_port, wait_for_port, Azurite};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use vmss_healer::scaleset::ScaleSetId;
use vmss_healer::settings::StorageSettings;
use vmss_healer::state::Store;

pub const SUB: &str = "00000000-0000-0000-0000-000000000001";
/// A second subscription, for what is counted per subscription (throttling).
pub const OTHER_SUB: &str = "00000000-0000-0000-0000-000000000002";
pub const RG: &str = "rg-fleet";
pub const IDENTITY_SECRET: &str = "test-identity-secret";

pub fn scale_set_id(name: &str) -> String {
    scale_set_id_in(SUB, name)
}

pub fn scale_set_id_in(subscription: &str, name: &str) -> String {
    format!("/subscriptions/{subscription}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachineScaleSets/{name}")
}

pub fn now_rfc3339(offset: time::Duration) -> String {
    (OffsetDateTime::now_utc() + offset)
        .format(&Rfc3339)
        .unwrap()
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct TestApp {
    pub azurite: Azurite,
    sim: Process,
    handler: Process,
    pub sim_url: String,
    pub handler_url: String,
    pub http: reqwest::Client,
    pub store: Store,
    /// The handler's environment, for running its operator commands against the same deployment.
    handler_env: Vec<(String, String)>,
    /// Everything the handler wrote to stdout and stderr (the Functions host's log stream).
    log_path: std::path::PathBuf,
}

/// Standard output and error of a handler, appended to one file.
fn log_to(path: &std::path::Path) -> (Stdio, Stdio) {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open the handler's log file");
    let err = file.try_clone().expect("clone the log file handle");
    (Stdio::from(file), Stdio::from(err))
}

/// A scale set's orchestration mode: the end-to-end scenarios run in both (`in_both_modes!`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Uniform,
    Flexible,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Uniform => "Uniform",
            Mode::Flexible => "Flexible",
        }
    }
}

/// Runs each named scenario, an `async fn(Mode)`, as two tests: `<name>::uniform` and
/// `<name>::flexible`.
#[macro_export]
macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn uniform() {
                    super::$name($crate::common::Mode::Uniform).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn flexible() {
                    super::$name($crate::common::Mode::Flexible).await
                }
            }
        )*
    };
}

pub struct Builder {
    /// The simulator's admin bodies for the scale sets to create.
    sets: Vec<Value>,
    /// The orchestration mode of the scale sets added after it is set.
    mode: Mode,
    env: BTreeMap<String, String>,
    page_size: usize,
}

/// A handler whose DOWN counts at once (tests about `HEALER_DOWN_FOR` set it back) and whose
/// mirror pass reads every scale set every time (`HEALER_FULL_RESYNC=0`), so a scenario sees what
/// it changed in the simulator without delivering Resource Manager events; the tests of the
/// event-driven mirror set the interval back. Repairs are the timer's (`HEALER_EVENT_REPAIRS=false`),
/// so a scenario decides when a pass acts; the tests of event-driven repairs (`tests/prompt.rs`)
/// turn them on.
pub fn spawn_app() -> Builder {
    Builder {
        sets: Vec::new(),
        env: BTreeMap::from([
            ("HEALER_DOWN_FOR".to_string(), "0".to_string()),
            ("HEALER_FULL_RESYNC".to_string(), "0".to_string()),
            ("HEALER_EVENT_REPAIRS".to_string(), "false".to_string()),
        ]),
        page_size: 100,
        mode: Mode::Uniform,
    }
}

impl Builder {
    /// A scale set of `capacity` VMs that have been running for a day.
    pub fn scale_set(self, name: &str, capacity: usize) -> Self {
        self.scale_set_spec(json!({"name": name, "capacity": capacity}))
    }

    /// The orchestration mode of the scale sets added from here on.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// A scale set described by the simulator's admin body (`automaticRepairs`, `zones`, …).
    pub fn scale_set_spec(mut self, spec: Value) -> Self {
        let mut body = json!({"subscription": SUB, "resourceGroup": RG, "ageSeconds": 86_400,
                              "orchestrationMode": self.mode.as_str()});
        for (k, v) in spec.as_object().expect("a JSON object") {
            body[k] = v.clone();
        }
        self.sets.push(body);
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.insert(key.to_string(), value.to_string());
        self
    }

    /// The simulator's page size for instance lists (to exercise nextLink paging).
    pub fn page_size(mut self, n: usize) -> Self {
        self.page_size = n;
        self
    }

    pub async fn start(self) -> TestApp {
        let azurite = Azurite::start();
        let sim_port = free_port();
        let mut sim = Command::new(env!("CARGO_BIN_EXE_compute-sim"))
            .args([
                "--port",
                &sim_port.to_string(),
                "--page-size",
                &self.page_size.to_string(),
            ])
            .args(["--identity-secret", IDENTITY_SECRET])
            .stdout(Stdio::null())
            .spawn()
            .expect("start compute-sim");
        wait_for_port(sim_port, Duration::from_secs(20), "compute-sim", &mut sim);
        let sim_url = format!("http://127.0.0.1:{sim_port}");
        let http = reqwest::Client::new();
        for body in &self.sets {
            let r = http
                .post(format!("{sim_url}/admin/scalesets"))
                .json(body)
                .send()
                .await
                .expect("create scale set");
            assert!(r.status().is_success(), "creating {body}: {}", r.status());
        }
        // The fleet existed before the healer watched it: its creation is not news.
        let r = http
            .delete(format!("{sim_url}/admin/resource-events"))
            .send()
            .await
            .expect("clear resource events");
        assert!(r.status().is_success());

        let handler_port = free_port();
        let ids: Vec<String> = self
            .sets
            .iter()
            .map(|b| {
                scale_set_id_in(
                    b["subscription"].as_str().unwrap_or(SUB),
                    b["name"].as_str().expect("a scale set name"),
                )
            })
            .collect();
        let mut handler_env: Vec<(String, String)> = vec![
            ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
            ("RUST_LOG".into(), "info".into()),
            (
                "FUNCTIONS_CUSTOMHANDLER_PORT".into(),
                handler_port.to_string(),
            ),
            ("HEALER_SCALE_SETS".into(), ids.join(",")),
            ("HEALER_STORAGE".into(), azurite.connection_string()),
            ("HEALER_ARM_ENDPOINT".into(), sim_url.clone()),
            ("IDENTITY_ENDPOINT".into(), format!("{sim_url}/msi/token")),
            ("IDENTITY_HEADER".into(), IDENTITY_SECRET.into()),
        ];
        let own_storage = self.env.contains_key("HEALER_STORAGE");
        handler_env.extend(self.env.clone());
        let log_path = std::env::temp_dir().join(format!("handler-{}.log", uuid::Uuid::new_v4()));
        let (out, err) = log_to(&log_path);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_handler"));
        cmd.env_clear()
            .envs(handler_env.iter().map(|(k, v)| (k, v)))
            .stdout(out)
            .stderr(err);
        let mut handler = cmd.spawn().expect("start handler");
        wait_for_port(
            handler_port,
            Duration::from_secs(20),
            "handler",
            &mut handler,
        );
        let handler_url = format!("http://127.0.0.1:{handler_port}");

        let store = Store::connect(
            &StorageSettings::ConnectionString(azurite.connection_string()),
            |_| anyhow::bail!("no identity in tests"),
        )
        .expect("connect to Azurite");
        if own_storage {
            // The handler was given other storage (a test of storage faults): it cannot be
            // relied on to create these tables.
            store.ensure_tables().await.expect("create the tables");
        }
        // Wait for the handler's own startup task to create the tables.
        let deadline = Instant::now() + Duration::from_secs(20);
        while store
            .scale_set(&ScaleSetId::new("x", "x", "x"))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "the handler did not create its tables"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The handler creates `operations` after `scalesets`: a test that writes an operation at
        // once lost that race under the full suite's load (TableMissing, seen twice). Creating
        // what is still missing here (idempotent) leaves the test nothing to race.
        store
            .ensure_tables()
            .await
            .expect("create the tables the handler has not yet");
        TestApp {
            azurite,
            sim: Process(sim),
            handler: Process(handler),
            sim_url,
            handler_url,
            http,
            store,
            handler_env,
            log_path,
        }
    }
}

impl TestApp {
    /// Stops the handler and starts it again with `changes` to its settings (an operator changing
    /// the Function App's settings); the tables and the simulator keep their state.
    pub fn restart_handler(&mut self, changes: &[(&str, &str)]) {
        for (key, value) in changes {
            self.handler_env.retain(|(k, _)| k != key);
            self.handler_env.push((key.to_string(), value.to_string()));
        }
        let port = free_port();
        self.handler_env
            .retain(|(k, _)| k != "FUNCTIONS_CUSTOMHANDLER_PORT");
        self.handler_env
            .push(("FUNCTIONS_CUSTOMHANDLER_PORT".into(), port.to_string()));
        let (out, err) = log_to(&self.log_path);
        let mut child = Command::new(env!("CARGO_BIN_EXE_handler"))
            .env_clear()
            .envs(self.handler_env.iter().map(|(k, v)| (k, v)))
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("restart handler");
        wait_for_port(port, Duration::from_secs(20), "handler", &mut child);
        // The old process stops when its handle is dropped.
        self.handler = Process(child);
        self.handler_url = format!("http://127.0.0.1:{port}");
    }

    /// Runs heartbeat round, mirror pass and repair pass until `done` holds for the scale set's
    /// journal (oldest first), which it returns; fails after `limit`.
    pub async fn drive_until(
        &self,
        name: &str,
        limit: Duration,
        done: impl Fn(&[vmss_healer::journal::Entry]) -> bool,
    ) -> Vec<vmss_healer::journal::Entry> {
        let set = Self::scale_set(name);
        let deadline = Instant::now() + limit;
        loop {
            self.heartbeat_round().await;
            self.invoke_timer("monitor-state").await;
            let (status, answer) = self.invoke_timer("monitor-status").await;
            assert_eq!(status, 200, "{answer}");
            let (mut journal, _) = self.recent_journal(&set).await;
            journal.reverse();
            if done(&journal) {
                return journal;
            }
            assert!(
                Instant::now() < deadline,
                "not done in time; journal: {journal:#?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Starts another handler of this deployment with `changes` to its settings and waits up to
    /// `limit` for it to stop by itself: its exit code (`None`: still running, then stopped) and
    /// what it wrote to stderr.
    pub fn start_handler_expecting_exit(
        &self,
        changes: &[(&str, &str)],
        limit: Duration,
    ) -> (Option<i32>, String) {
        let mut env = self.handler_env.clone();
        for (key, value) in changes {
            env.retain(|(k, _)| k != key);
            env.push((key.to_string(), value.to_string()));
        }
        env.retain(|(k, _)| k != "FUNCTIONS_CUSTOMHANDLER_PORT");
        env.push((
            "FUNCTIONS_CUSTOMHANDLER_PORT".into(),
            free_port().to_string(),
        ));
        let mut child = Command::new(env!("CARGO_BIN_EXE_handler"))
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start handler");
        let deadline = Instant::now() + limit;
        let code = loop {
            match child.try_wait().expect("wait for the handler") {
                Some(status) => break status.code(),
                None if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut stderr);
        }
        (code, stderr)
    }

    /// The handler process's id.
    pub fn handler_pid(&self) -> u32 {
        self.handler.0.id()
    }

    /// What the handler logged so far (stdout and stderr, as the host's log stream has them).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the handler's log has a line containing `needle`, and returns the log.
    pub async fn wait_for_log(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let logs = self.logs();
            if logs.contains(needle) {
                return logs;
            }
            assert!(
                Instant::now() < deadline,
                "no log line with `{needle}` within {limit:?}:\n{logs}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The simulator's long-running operations so far, oldest first, with how each ended.
    pub async fn operations(&self) -> Vec<Value> {
        self.admin(reqwest::Method::GET, "operations", None)
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Operations take this long from now on (0: they end at once).
    pub async fn operation_delay_ms(&self, ms: u64) {
        self.admin(
            reqwest::Method::PUT,
            "operations/delay",
            Some(json!({ "ms": ms })),
        )
        .await;
    }

    /// Ends every running operation now.
    /// Forgets the Resource Manager events raised so far.
    pub async fn clear_resource_events_now(&self) {
        self.admin(reqwest::Method::DELETE, "resource-events", None)
            .await;
    }

    pub async fn complete_operations(&self) {
        self.admin(reqwest::Method::POST, "operations/complete", None)
            .await;
    }

    /// Runs `handler <args>` (an operator command) with the deployment's settings; returns the
    /// exit code, stdout and stderr.
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_handler"))
            .args(args)
            .env_clear()
            .envs(self.handler_env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run the handler's command");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// An operator's command left running (`--follow`), its standard output piped; stopped when
    /// dropped, a failed test's too.
    pub fn cli_spawn(&self, args: &[&str]) -> Running {
        Running(
            Command::new(env!("CARGO_BIN_EXE_handler"))
                .args(args)
                .env_clear()
                .envs(self.handler_env.iter().map(|(k, v)| (k, v)))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("run the handler's command"),
        )
    }

    /// POSTs a raw body to the handler as the host would; returns status and JSON answer.
    pub async fn post_raw(&self, function: &str, body: String) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/{function}", self.handler_url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("reach the handler");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        let value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("answer is not JSON: {text:?}"));
        (status, value)
    }

    pub async fn invoke_timer(&self, function: &str) -> (u16, Value) {
        let body = json!({
            "Data": {"timer": {"Schedule": {"AdjustForDST": true},
                "ScheduleStatus": {"Last": now_rfc3339(time::Duration::minutes(-1)), "Next": now_rfc3339(time::Duration::minutes(1)),
                                   "LastUpdated": now_rfc3339(time::Duration::minutes(-1))},
                "IsPastDue": false}},
            "Metadata": {"sys": {"MethodName": function, "UtcNow": now_rfc3339(time::Duration::ZERO),
                                 "RandGuid": "9cd4c06c-fc8f-4b63-af94-56bc75c3f0cb"}}
        });
        self.post_raw(function, body.to_string()).await
    }

    /// Delivers one event to monitor-events exactly as the host's Event Grid trigger does.
    pub async fn deliver_event(&self, event: Value) -> (u16, Value) {
        let body = json!({
            "Data": {"event": event},
            "Metadata": {"sys": {"MethodName": "monitor-events", "UtcNow": now_rfc3339(time::Duration::ZERO),
                                 "RandGuid": "1b5e3f4e-0000-4000-8000-000000000000"}}
        });
        self.post_raw("monitor-events", body.to_string()).await
    }

    pub fn key(name: &str) -> String {
        format!("{SUB}:{RG}:{name}").to_lowercase()
    }

    /// Calls the simulator's admin API; panics unless it answers 2xx. Returns the JSON answer
    /// (null for an empty body).
    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self
            .http
            .request(method.clone(), format!("{}/admin/{path}", self.sim_url));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("reach the simulator");
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert!(
            status.is_success(),
            "{method} /admin/{path}: {status} {text}"
        );
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// The simulator's view of a scale set: its VMs with their ids, vmIds and states.
    pub async fn fleet(&self, name: &str) -> Value {
        self.admin(
            reqwest::Method::GET,
            &format!("scalesets/{}", Self::key(name)),
            None,
        )
        .await
    }

    pub async fn vm(&self, name: &str, instance: u64) -> Value {
        let fleet = self.fleet(name).await;
        fleet["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["instance_id"] == json!(instance))
            .cloned()
            .unwrap_or_else(|| panic!("instance {instance} not in {name}"))
    }

    /// The instance's key as the handler knows it: its instance id (Uniform) or its VM name in
    /// lower case (Flexible).
    pub async fn key_of(&self, name: &str, instance: u64) -> String {
        let vm = self.vm(name, instance).await;
        match vm["name"].as_str() {
            Some(vm_name) => vm_name.to_ascii_lowercase(),
            None => instance.to_string(),
        }
    }

    /// The VM's resource id, as its agent reads it from IMDS: a scale-set VM (Uniform) or a plain
    /// VM (Flexible).
    pub async fn resource_id_of(&self, name: &str, instance: u64) -> String {
        let vm = self.vm(name, instance).await;
        match vm["name"].as_str() {
            Some(vm_name) => format!(
                "/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachines/{vm_name}"
            ),
            None => format!("{}/virtualMachines/{instance}", scale_set_id(name)),
        }
    }

    /// A heartbeat of the VM, with its vmId and its resource id as subject, in either mode.
    pub async fn heartbeat_of(&self, name: &str, instance: u64, status: &str, at: &str) -> Value {
        let vm = self.vm(name, instance).await;
        let mut event = heartbeat_event(name, instance, vm["vm_id"].as_str().unwrap(), status, at);
        event["subject"] = json!(self.resource_id_of(name, instance).await);
        event
    }

    pub async fn break_vm(&self, name: &str, instance: u64, patch: Value) {
        let path = format!("scalesets/{}/vms/{instance}", Self::key(name));
        self.admin(reqwest::Method::PATCH, &path, Some(patch)).await;
    }

    pub async fn set_capacity(&self, name: &str, capacity: usize) {
        let path = format!("scalesets/{}/capacity", Self::key(name));
        self.admin(
            reqwest::Method::PUT,
            &path,
            Some(json!({"capacity": capacity})),
        )
        .await;
    }

    pub async fn delete_scale_set(&self, name: &str) {
        self.admin(
            reqwest::Method::DELETE,
            &format!("scalesets/{}", Self::key(name)),
            None,
        )
        .await;
    }

    /// The usual start of a scenario: mirror the fleet, break one VM, let every VM report once,
    /// and forget the Compute calls so far.
    pub async fn sync_and_break(&self, name: &str, instance: u64, patch: Value) {
        let (status, answer) = self.invoke_timer("monitor-state").await;
        assert_eq!(status, 200, "{answer}");
        self.break_vm(name, instance, patch).await;
        self.heartbeat_round().await;
        self.clear_compute_calls().await;
    }

    /// Heartbeat rounds and `monitor-status` passes, a few per second, until a pass's answer
    /// satisfies `done` (bounded): how a scenario waits out a set's settling after a pause
    /// (`HEALER_HEARTBEAT_TIMEOUT`, a few seconds in such scenarios). The answer that did.
    pub async fn passes_until(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.heartbeat_round().await;
            let (status, answer) = self.invoke_timer("monitor-status").await;
            assert_eq!(status, 200, "{answer}");
            if done(&answer["ReturnValue"]) {
                return answer["ReturnValue"].clone();
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within 30 s: {answer}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Every live VM that is not silent publishes one heartbeat through the handler.
    pub async fn heartbeat_round(&self) -> Value {
        let target = json!({"target": self.handler_url});
        self.admin(reqwest::Method::POST, "heartbeats", Some(target))
            .await
    }

    /// Delivers the Resource Manager events the simulator raised so far to `monitor-events`, as
    /// the resource group's system topic would; returns how many were sent.
    pub async fn resource_events(&self) -> u64 {
        let target = json!({"target": self.handler_url});
        let answer = self
            .admin(reqwest::Method::POST, "resource-events", Some(target))
            .await;
        assert_eq!(answer["failed"], 0, "{answer}");
        answer["sent"].as_u64().unwrap_or_default()
    }

    pub async fn inject_fault(&self, fault: Value) {
        self.admin(reqwest::Method::POST, "faults", Some(fault))
            .await;
    }

    /// The ARM calls the simulator received, oldest first.
    pub async fn compute_calls(&self) -> Vec<Value> {
        let calls = self.admin(reqwest::Method::GET, "calls", None).await;
        calls.as_array().cloned().unwrap_or_default()
    }

    pub async fn clear_compute_calls(&self) {
        self.admin(reqwest::Method::DELETE, "calls", None).await;
    }

    /// The last hour of a scale set's journal, newest first.
    pub async fn recent_journal(
        &self,
        set: &ScaleSetId,
    ) -> (
        Vec<vmss_healer::journal::Entry>,
        vmss_healer::state::Skipped,
    ) {
        self.store
            .journal(set, OffsetDateTime::now_utc() - time::Duration::hours(1))
            .await
            .expect("read the journal")
    }

    /// The heartbeat stored for an instance (panics if there is none).
    pub async fn stored_heartbeat(
        &self,
        name: &str,
        instance: &str,
    ) -> vmss_healer::heartbeat::Heartbeat {
        self.store
            .heartbeat(&Self::scale_set(name), instance)
            .await
            .expect("read the heartbeat")
            .unwrap_or_else(|| panic!("no heartbeat stored for {name}#{instance}"))
            .heartbeat
    }

    pub fn scale_set(name: &str) -> ScaleSetId {
        ScaleSetId::parse(&scale_set_id(name)).unwrap()
    }
}

/// Each scale set's outcome in a `monitor-state` answer, in settings order.
pub fn sync_outcomes(answer: &Value) -> Vec<&str> {
    answer["ReturnValue"]["scale_sets"]
        .as_array()
        .map(|sets| {
            sets.iter()
                .map(|s| s["outcome"].as_str().unwrap_or("?"))
                .collect()
        })
        .unwrap_or_default()
}

/// A design §2 heartbeat event (Event Grid schema) for one VM.
pub fn heartbeat_event(
    set: &str,
    instance: u64,
    vm_id: &str,
    status: &str,
    event_time: &str,
) -> Value {
    json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "topic": "/subscriptions/x/resourceGroups/x/providers/Microsoft.EventGrid/topics/heartbeats",
        "subject": format!("{}/virtualMachines/{instance}", scale_set_id(set)),
        "eventType": "VmssHealer.Heartbeat",
        "eventTime": event_time,
        "dataVersion": "1",
        "metadataVersion": "1",
        "data": {"status": status, "vmId": vm_id, "computerName": format!("{set}{instance:06}"), "sequence": 1}
    })
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log_path);
    }
}

/// A command still running; killed when dropped.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
