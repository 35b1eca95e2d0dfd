//! The Linux heartbeat agent (`infra/agent/vmss-healer-agent`), run for real: bash and curl against
//! a local IMDS stand-in (instance metadata and managed-identity tokens, refusing requests without
//! `Metadata: true`) and a local receiver speaking the Event Grid publish API (bearer token and
//! schema checked, 200 / 401 / 5xx on demand). What it publishes goes through the handler's
//! `monitor-events` and must be accepted.

mod common;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use common::{scale_set_id, spawn_app, TestApp};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const AGENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/infra/agent/vmss-healer-agent");

// ---- the IMDS stand-in ----

#[derive(Clone, Default)]
struct Imds {
    inner: Arc<Mutex<ImdsState>>,
}

#[derive(Default)]
struct ImdsState {
    compute: HashMap<&'static str, String>,
    /// Answer token requests with 400 (the identity is not assigned).
    refuse_tokens: bool,
    tokens_issued: u32,
    token_serial: u32,
    requests_without_header: u32,
    /// Which test chain signs attested documents (`trusted` stands in for the platform).
    signer: &'static str,
    /// The scheduled events document's events, as IMDS serves them.
    events: Vec<Value>,
    incarnation: u32,
    /// EventIds approved with a `StartRequests` POST, in order.
    approved: Vec<String>,
    /// Scheduled events come from the Compute simulator (its admin API, for this VM name) rather
    /// than from `events`: what its deletes schedule, this VM sees.
    simulator: Option<(String, String)>,
}

impl Imds {
    fn for_vm(resource_id: &str, vm_id: &str, computer_name: &str) -> Self {
        let imds = Imds::default();
        {
            let mut s = imds.inner.lock().unwrap();
            s.compute.insert("resourceId", resource_id.into());
            s.compute.insert("vmId", vm_id.into());
            s.compute
                .insert("osProfile/computerName", computer_name.into());
            // The VM's name, as scheduled events list it: `{scale set}_{instance id}` for a
            // Uniform instance ("Instance IDs for Azure VM scale set VMs": instance metadata VM
            // name), the VM's own name otherwise.
            let segments: Vec<&str> = resource_id.split('/').collect();
            let name = match segments.as_slice() {
                [.., "virtualMachineScaleSets", set, "virtualMachines", id] => {
                    format!("{set}_{id}")
                }
                [.., last] => last.to_string(),
                [] => String::new(),
            };
            s.compute.insert("name", name);
            s.signer = "trusted";
        }
        imds
    }

    fn current_token(&self) -> String {
        format!("imds-token-{}", self.inner.lock().unwrap().token_serial)
    }

    fn tokens_issued(&self) -> u32 {
        self.inner.lock().unwrap().tokens_issued
    }

    fn router(self) -> Router {
        Router::new()
            .route("/metadata/instance/compute/{*leaf}", get(imds_leaf))
            .route("/metadata/identity/oauth2/token", get(imds_token))
            .route("/metadata/attested/document", get(imds_attested))
            .route(
                "/metadata/scheduledevents",
                get(imds_events).post(imds_approve),
            )
            .with_state(self)
    }

    /// Schedules an event, as the platform would (`NotBefore` an HTTP date, as IMDS gives it).
    fn schedule(&self, id: &str, kind: &str, resources: &[&str], not_before: time::OffsetDateTime) {
        let http_date = not_before
            .format(time::macros::format_description!(
                "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
            ))
            .unwrap();
        let mut s = self.inner.lock().unwrap();
        s.incarnation += 1;
        s.events.push(json!({
            "EventId": id, "EventType": kind, "ResourceType": "VirtualMachine",
            "Resources": resources, "EventStatus": "Scheduled", "NotBefore": http_date,
            "Description": "", "EventSource": "Platform", "DurationInSeconds": -1
        }));
    }

    /// The events end (the VM was rebooted or redeployed, or they were cancelled).
    fn clear_events(&self) {
        let mut s = self.inner.lock().unwrap();
        s.incarnation += 1;
        s.events.clear();
    }

    fn approved(&self) -> Vec<String> {
        self.inner.lock().unwrap().approved.clone()
    }
}

/// `GET /metadata/scheduledevents`: the document ("Scheduled Events for Linux VMs").
async fn imds_events(
    State(imds): State<Imds>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if !metadata_header_ok(&headers, &imds) {
        return no_metadata_header();
    }
    if !q.contains_key("api-version") {
        return (StatusCode::BAD_REQUEST, "api-version expected").into_response();
    }
    let simulator = imds.inner.lock().unwrap().simulator.clone();
    if let Some((url, vm)) = simulator {
        let doc: Value = reqwest::get(format!("{url}/admin/scheduledevents?vm={vm}"))
            .await
            .and_then(|r| r.error_for_status())
            .expect("the simulator's scheduled events")
            .json()
            .await
            .expect("JSON");
        return Json(doc).into_response();
    }
    let s = imds.inner.lock().unwrap();
    Json(json!({"DocumentIncarnation": s.incarnation, "Events": s.events})).into_response()
}

/// `POST /metadata/scheduledevents` with `{"StartRequests": [{"EventId": …}]}`: an approved event
/// starts (its status `Started`, its NotBefore gone).
async fn imds_approve(State(imds): State<Imds>, headers: HeaderMap, body: String) -> Response {
    if !metadata_header_ok(&headers, &imds) {
        return no_metadata_header();
    }
    let Ok(body) = serde_json::from_str::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    let ids: Vec<String> = body["StartRequests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["EventId"].as_str().map(str::to_string))
        .collect();
    if ids.is_empty() {
        return (StatusCode::BAD_REQUEST, "no StartRequests").into_response();
    }
    let simulator = imds.inner.lock().unwrap().simulator.clone();
    if let Some((url, _)) = simulator {
        let answer = reqwest::Client::new()
            .post(format!("{url}/admin/scheduledevents"))
            .json(&body)
            .send()
            .await
            .expect("the simulator takes approvals");
        imds.inner.lock().unwrap().approved.extend(ids);
        return StatusCode::from_u16(answer.status().as_u16())
            .unwrap_or(StatusCode::BAD_GATEWAY)
            .into_response();
    }
    let mut s = imds.inner.lock().unwrap();
    for id in &ids {
        for e in s.events.iter_mut().filter(|e| e["EventId"] == id.as_str()) {
            e["EventStatus"] = json!("Started");
            e["NotBefore"] = json!("");
        }
    }
    s.incarnation += 1;
    s.approved.extend(ids);
    StatusCode::OK.into_response()
}

fn metadata_header_ok(headers: &HeaderMap, imds: &Imds) -> bool {
    let ok = headers.get("metadata").and_then(|v| v.to_str().ok()) == Some("true");
    if !ok {
        imds.inner.lock().unwrap().requests_without_header += 1;
    }
    ok
}

fn no_metadata_header() -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": "Bad request. Required metadata header not specified"})),
    )
        .into_response()
}

async fn imds_leaf(
    State(imds): State<Imds>,
    Path(leaf): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if !metadata_header_ok(&headers, &imds) {
        return no_metadata_header();
    }
    if !q.contains_key("api-version") || q.get("format").map(String::as_str) != Some("text") {
        return (
            StatusCode::BAD_REQUEST,
            "api-version and format=text expected",
        )
            .into_response();
    }
    match imds.inner.lock().unwrap().compute.get(leaf.as_str()) {
        Some(v) => v.clone().into_response(),
        None => (StatusCode::NOT_FOUND, "no such leaf").into_response(),
    }
}

async fn imds_token(
    State(imds): State<Imds>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if !metadata_header_ok(&headers, &imds) {
        return no_metadata_header();
    }
    if q.get("resource").map(String::as_str) != Some("https://eventgrid.azure.net") {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_resource"})),
        )
            .into_response();
    }
    let mut s = imds.inner.lock().unwrap();
    if s.refuse_tokens {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_request", "error_description": "Identity not found"})),
        )
            .into_response();
    }
    s.tokens_issued += 1;
    let expires_on = time::OffsetDateTime::now_utc().unix_timestamp() + 3600;
    Json(json!({
        "access_token": format!("imds-token-{}", s.token_serial),
        "expires_in": "3600",
        "expires_on": expires_on.to_string(),
        "resource": "https://eventgrid.azure.net",
        "token_type": "Bearer",
    }))
    .into_response()
}

use common::attested::{sign_document, FIXTURES};

fn imds_document(vm_id: &str, nonce: &str) -> String {
    let now = time::OffsetDateTime::now_utc();
    let stamp = |t: time::OffsetDateTime| {
        format!(
            "{:02}/{:02}/{:02} {:02}:{:02}:{:02} -0000",
            u8::from(t.month()),
            t.day(),
            t.year() % 100,
            t.hour(),
            t.minute(),
            t.second()
        )
    };
    json!({"licenseType": "", "nonce": nonce, "plan": {"name": "", "product": "", "publisher": ""},
        "sku": "22_04-lts-gen2", "subscriptionId": common::SUB,
        "timeStamp": {"createdOn": stamp(now), "expiresOn": stamp(now + time::Duration::hours(6))},
        "vmId": vm_id})
    .to_string()
}

async fn imds_attested(
    State(imds): State<Imds>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if !metadata_header_ok(&headers, &imds) {
        return no_metadata_header();
    }
    let nonce = q.get("nonce").cloned().unwrap_or_default();
    if nonce.len() > 10 || !nonce.chars().all(|c| c.is_ascii_digit()) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "nonce must be up to 10 digits"})),
        )
            .into_response();
    }
    let (vm_id, signer) = {
        let s = imds.inner.lock().unwrap();
        (s.compute.get("vmId").cloned().unwrap_or_default(), s.signer)
    };
    let signature =
        tokio::task::spawn_blocking(move || sign_document(signer, &imds_document(&vm_id, &nonce)))
            .await
            .unwrap();
    Json(json!({"encoding": "pkcs7", "signature": signature})).into_response()
}

// ---- the Event Grid topic stand-in, and the VM's own health endpoint ----

#[derive(Clone)]
struct Topic {
    imds: Imds,
    inner: Arc<Mutex<TopicState>>,
}

#[derive(Default)]
struct TopicState {
    /// Answer every publish with this status instead of checking it.
    fail_with: Option<u16>,
    accepted: Vec<Value>,
    answered: HashMap<u16, u32>,
    /// The health endpoint: 200, 500, or 0 to hang.
    health: u16,
}

impl Topic {
    fn new(imds: Imds) -> Self {
        let topic = Topic {
            imds,
            inner: Arc::default(),
        };
        topic.inner.lock().unwrap().health = 200;
        topic
    }

    fn set(&self, f: impl FnOnce(&mut TopicState)) {
        f(&mut self.inner.lock().unwrap());
    }

    fn accepted(&self) -> Vec<Value> {
        self.inner.lock().unwrap().accepted.clone()
    }

    fn answered(&self, status: u16) -> u32 {
        *self
            .inner
            .lock()
            .unwrap()
            .answered
            .get(&status)
            .unwrap_or(&0)
    }

    fn router(self) -> Router {
        Router::new()
            .route("/api/events", post(publish))
            .route("/healthz", get(health))
            .with_state(self)
    }
}

fn schema_problem(event: &Value, cloudevents: bool) -> Option<String> {
    let text = |k: &str| {
        event
            .get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let required: &[&str] = if cloudevents {
        &["specversion", "id", "type", "source", "subject", "time"]
    } else {
        &["id", "eventType", "subject", "eventTime", "dataVersion"]
    };
    if let Some(missing) = required.iter().find(|k| text(k).is_none()) {
        return Some(format!("missing {missing}"));
    }
    let time = text(if cloudevents { "time" } else { "eventTime" })?;
    if time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339).is_err() {
        return Some(format!("time `{time}` is not RFC 3339"));
    }
    if !event["data"].is_object() {
        return Some("data is not an object".into());
    }
    None
}

async fn publish(
    State(topic): State<Topic>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let answer = |status: u16, body: Value| {
        *topic
            .inner
            .lock()
            .unwrap()
            .answered
            .entry(status)
            .or_default() += 1;
        (StatusCode::from_u16(status).unwrap(), Json(body)).into_response()
    };
    let injected = topic.inner.lock().unwrap().fail_with;
    if let Some(status) = injected {
        return answer(
            status,
            json!({"error": {"code": "Injected", "message": "on demand"}}),
        );
    }
    if q.get("api-version").map(String::as_str) != Some("2018-01-01") {
        return answer(
            400,
            json!({"error": {"message": "api-version 2018-01-01 expected"}}),
        );
    }
    let expected = format!("Bearer {}", topic.imds.current_token());
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return answer(
            401,
            json!({"error": {"code": "Unauthorized", "message": "bad bearer token"}}),
        );
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let cloudevents = content_type.starts_with("application/cloudevents-batch+json");
    if !cloudevents && !content_type.starts_with("application/json") {
        return answer(
            400,
            json!({"error": {"message": format!("content type {content_type}")}}),
        );
    }
    let events: Vec<Value> = match serde_json::from_str(&body) {
        Ok(Value::Array(events)) if !events.is_empty() => events,
        _ => {
            return answer(
                400,
                json!({"error": {"message": "a JSON array of events expected"}}),
            )
        }
    };
    for event in &events {
        if let Some(problem) = schema_problem(event, cloudevents) {
            return answer(400, json!({"error": {"message": problem}}));
        }
    }
    topic.inner.lock().unwrap().accepted.extend(events);
    answer(200, Value::Null)
}

async fn health(State(topic): State<Topic>) -> Response {
    let status = topic.inner.lock().unwrap().health;
    if status == 0 {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    StatusCode::from_u16(status).unwrap().into_response()
}

async fn serve(router: Router, port: u16) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind a stand-in");
    tokio::spawn(async move { axum::serve(listener, router).await });
}

// ---- the agent process ----

struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("vmss-agent-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::create_dir_all(dir.join("state")).unwrap();
        // Records what the agent tells systemd, as the watchdog would see it.
        let notify = dir.join("bin/systemd-notify");
        std::fs::write(
            &notify,
            format!(
                "#!/bin/sh\necho \"$*\" >> '{}'\n",
                dir.join("notified").display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&notify, std::fs::Permissions::from_mode(0o755)).unwrap();
        Scratch(dir)
    }

    fn notified(&self) -> Vec<String> {
        std::fs::read_to_string(self.0.join("notified"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.0.join("agent.log")).unwrap_or_default()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Agent {
    child: Child,
    scratch: Scratch,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent_command(
    scratch: &Scratch,
    imds_port: u16,
    topic_port: u16,
    env: &[(&str, &str)],
    args: &[&str],
) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(AGENT)
        .args(args)
        .env_clear()
        .env(
            "PATH",
            format!(
                "{}:{}",
                scratch.0.join("bin").display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("NOTIFY_SOCKET", "@vmss-healer-test")
        .env("HEALER_AGENT_ENV", scratch.0.join("no-such.env"))
        .env(
            "HEALER_IMDS_ENDPOINT",
            format!("http://127.0.0.1:{imds_port}"),
        )
        .env(
            "HEALER_TOPIC_ENDPOINT",
            format!("http://127.0.0.1:{topic_port}/api/events"),
        )
        .env("HEALER_STATE_DIR", scratch.0.join("state"))
        .env("HEALER_INTERVAL", "0.3")
        .env("HEALER_HEALTH_TIMEOUT", "0.5");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn start_agent(imds_port: u16, topic_port: u16, env: &[(&str, &str)]) -> Agent {
    let scratch = Scratch::new();
    let log = std::fs::File::create(scratch.0.join("agent.log")).unwrap();
    let child = agent_command(&scratch, imds_port, topic_port, env, &["run"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("run the agent with bash");
    Agent { child, scratch }
}

/// Waits until `done` holds, failing with the agent's log after `seconds`.
async fn until(agent: &Agent, seconds: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {seconds} s; agent log:\n{}",
            agent.scratch.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Fixture {
    app: TestApp,
    imds: Imds,
    topic: Topic,
    imds_port: u16,
    topic_port: u16,
}

/// The handler with one scale set, and stand-ins that make the agent instance 1 of it.
async fn fixture(start_imds: bool) -> Fixture {
    fixture_with(start_imds, &[]).await
}

async fn fixture_with(start_imds: bool, env: &[(&str, &str)]) -> Fixture {
    let mut app = spawn_app().scale_set("web", 3);
    for (k, v) in env {
        app = app.env(k, v);
    }
    let app = app.start().await;
    let (status, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(status, 200, "{answer}");
    let vm = app.vm("web", 1).await;
    let imds = Imds::for_vm(
        &format!("{}/virtualMachines/1", scale_set_id("web")),
        vm["vm_id"].as_str().unwrap(),
        vm["computer_name"].as_str().unwrap(),
    );
    let topic = Topic::new(imds.clone());
    let (imds_port, topic_port) = (common::azurite::free_port(), common::azurite::free_port());
    if start_imds {
        serve(imds.clone().router(), imds_port).await;
    }
    serve(topic.clone().router(), topic_port).await;
    Fixture {
        app,
        imds,
        topic,
        imds_port,
        topic_port,
    }
}

/// Feeds a published event to `monitor-events` as the Event Grid subscription would.
async fn through_handler(app: &TestApp, event: &Value) -> Value {
    let (status, answer) = app.deliver_event(event.clone()).await;
    assert_eq!(status, 200, "{answer}");
    answer["ReturnValue"].clone()
}

fn statuses(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["data"]["status"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reports_real_health_with_a_cached_token_and_the_handler_accepts_it() {
    let f = fixture(true).await;
    let health = format!("http://127.0.0.1:{}/healthz", f.topic_port);
    let agent = start_agent(f.imds_port, f.topic_port, &[("HEALER_HEALTH_URL", &health)]);

    until(&agent, 20, "three UP heartbeats", || {
        f.topic.accepted().len() >= 3
    })
    .await;
    let events = f.topic.accepted();
    assert!(statuses(&events).iter().all(|s| s == "UP"), "{events:?}");
    // One token for all of them: cached until near expiry.
    assert_eq!(f.imds.tokens_issued(), 1);
    // The stand-in is as strict as IMDS: without `Metadata: true` it answers 400 (the agent never
    // got one).
    let bare = reqwest::get(format!(
        "http://127.0.0.1:{}/metadata/identity/oauth2/token?resource=https://eventgrid.azure.net",
        f.imds_port
    ))
    .await
    .unwrap();
    assert_eq!(bare.status(), 400);
    f.imds.inner.lock().unwrap().requests_without_header -= 1;
    assert_eq!(f.imds.inner.lock().unwrap().requests_without_header, 0);
    let sequences: Vec<i64> = events
        .iter()
        .map(|e| e["data"]["sequence"].as_i64().unwrap())
        .collect();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]), "{sequences:?}");
    for event in &events[..2] {
        let answer = through_handler(&f.app, event).await;
        assert_eq!(answer["accepted"], true, "{answer}");
    }
    let set = TestApp::scale_set("web");
    let stored = f.app.store.heartbeats(&set).await.unwrap().0;
    assert_eq!(
        stored["1"].vm_id.as_deref(),
        f.imds
            .inner
            .lock()
            .unwrap()
            .compute
            .get("vmId")
            .map(String::as_str)
    );

    // The application fails its check: the agent says DOWN, with why.
    f.topic.set(|t| t.health = 500);
    let seen = f.topic.accepted().len();
    until(&agent, 20, "a DOWN heartbeat", || {
        f.topic.accepted()[seen..]
            .iter()
            .any(|e| e["data"]["status"] == "DOWN")
    })
    .await;
    let down = f.topic.accepted()[seen..]
        .iter()
        .find(|e| e["data"]["status"] == "DOWN")
        .cloned()
        .unwrap();
    assert!(
        down["data"]["detail"]
            .as_str()
            .unwrap()
            .contains("answered 500"),
        "{down}"
    );
    let answer = through_handler(&f.app, &down).await;
    assert_eq!(
        (answer["accepted"].clone(), answer["status"].clone()),
        (json!(true), json!("DOWN")),
        "{answer}"
    );

    // The check hangs: DOWN after the check's timeout, and the agent keeps its rhythm.
    f.topic.set(|t| t.health = 0);
    let seen = f.topic.accepted().len();
    until(&agent, 20, "two heartbeats with a hanging check", || {
        f.topic.accepted()[seen..]
            .iter()
            .filter(|e| {
                e["data"]["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("timed out"))
            })
            .count()
            >= 2
    })
    .await;

    // The watchdog is fed: READY once, WATCHDOG on every round.
    let notified = agent.scratch.notified();
    assert_eq!(
        notified.iter().filter(|n| *n == "READY=1").count(),
        1,
        "{notified:?}"
    );
    assert!(
        notified.iter().filter(|n| *n == "WATCHDOG=1").count() >= 3,
        "{notified:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_survives_imds_and_topic_failures_and_recovers() {
    // IMDS is not even listening when the agent starts.
    let f = fixture(false).await;
    let agent = start_agent(f.imds_port, f.topic_port, &[]);
    until(&agent, 20, "the agent to report IMDS unavailable", || {
        agent
            .scratch
            .log()
            .contains("IMDS instance metadata unavailable")
    })
    .await;
    serve(f.imds.clone().router(), f.imds_port).await;
    until(&agent, 20, "a heartbeat once IMDS is up", || {
        !f.topic.accepted().is_empty()
    })
    .await;

    // The topic answers 5xx: retried with backoff, nothing lost for good.
    f.topic.set(|t| t.fail_with = Some(503));
    until(&agent, 20, "a 503 retried", || f.topic.answered(503) >= 2).await;
    let seen = f.topic.accepted().len();
    f.topic.set(|t| t.fail_with = None);
    until(&agent, 20, "publishing again after 5xx", || {
        f.topic.accepted().len() > seen
    })
    .await;

    // The token is revoked (the topic answers 401 to it): the agent fetches a new one.
    let before = f.imds.tokens_issued();
    f.imds.inner.lock().unwrap().token_serial += 1;
    let seen = f.topic.accepted().len();
    until(&agent, 20, "a new token after 401", || {
        f.topic.answered(401) >= 1 && f.topic.accepted().len() > seen
    })
    .await;
    assert_eq!(f.imds.tokens_issued(), before + 1);

    // IMDS refuses tokens for a while (identity being re-assigned): no publish without one.
    f.imds.inner.lock().unwrap().refuse_tokens = true;
    f.imds.inner.lock().unwrap().token_serial += 1;
    until(&agent, 20, "the refusal logged", || {
        agent.scratch.log().contains("no token from IMDS (400)")
    })
    .await;
    let seen = f.topic.accepted().len();
    f.imds.inner.lock().unwrap().refuse_tokens = false;
    until(&agent, 20, "publishing again with a new token", || {
        f.topic.accepted().len() > seen
    })
    .await;

    // Through all of it the agent kept running, and what it sent is accepted by the handler.
    let mut child = agent;
    assert!(
        child.child.try_wait().unwrap().is_none(),
        "the agent exited:\n{}",
        child.scratch.log()
    );
    let last = f.topic.accepted().last().cloned().unwrap();
    assert_eq!(through_handler(&f.app, &last).await["accepted"], true);
    let _ = child.child.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_once_and_cloudevents() {
    let f = fixture(true).await;
    let scratch = Scratch::new();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = agent_command(&scratch, f.imds_port, f.topic_port, env, args)
            .output()
            .expect("run the agent");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };

    // `maintenance 30m` publishes MAINTENANCE at once, with the end of the window.
    let (code, log) = run(&["maintenance", "30m"], &[]);
    assert_eq!(code, Some(0), "{log}");
    let event = f.topic.accepted().last().cloned().unwrap();
    assert_eq!(event["data"]["status"], "MAINTENANCE", "{event}");
    let until = time::OffsetDateTime::parse(
        event["data"]["until"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let left = until - time::OffsetDateTime::now_utc();
    assert!(
        left > time::Duration::minutes(29) && left <= time::Duration::minutes(30),
        "{left}"
    );
    let answer = through_handler(&f.app, &event).await;
    assert_eq!(answer["status"], "MAINTENANCE", "{answer}");
    // … and every heartbeat until then says so, whatever the check says.
    let (code, log) = run(&["once"], &[("HEALER_HEALTH_COMMAND", "exit 3")]);
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(
        f.topic.accepted().last().unwrap()["data"]["status"],
        "MAINTENANCE"
    );
    let (code, log) = run(
        &["maintenance", "off"],
        &[("HEALER_HEALTH_COMMAND", "exit 3")],
    );
    assert_eq!(code, Some(0), "{log}");
    let event = f.topic.accepted().last().cloned().unwrap();
    assert_eq!(
        (
            event["data"]["status"].clone(),
            event["data"]["detail"].clone()
        ),
        (json!("DOWN"), json!("health command exited 3"))
    );

    // CloudEvents schema, accepted by the topic and by the handler.
    let (code, log) = run(&["once"], &[("HEALER_SCHEMA", "cloudevents")]);
    assert_eq!(code, Some(0), "{log}");
    let event = f.topic.accepted().last().cloned().unwrap();
    assert_eq!(event["specversion"], "1.0", "{event}");
    assert_eq!(through_handler(&f.app, &event).await["accepted"], true);

    // IMDS must be reached directly (it refuses proxied requests): a proxy configured for the
    // VM's outbound traffic — here one that does not answer — is bypassed for it, and still
    // used for the topic where NO_PROXY does not exempt it.
    let topic_by_name = format!("http://localhost:{}/api/events", f.topic_port);
    let (code, log) = run(
        &["once"],
        &[
            ("http_proxy", "http://127.0.0.1:1"),
            ("HTTP_PROXY", "http://127.0.0.1:1"),
            ("NO_PROXY", "localhost"),
            ("no_proxy", "localhost"),
            ("HEALER_TOPIC_ENDPOINT", topic_by_name.as_str()),
        ],
    );
    assert_eq!(code, Some(0), "IMDS through a dead proxy: {log}");

    // `once` fails when it could not publish.
    f.topic.set(|t| t.fail_with = Some(500));
    let (code, log) = run(&["once"], &[]);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("not published"), "{log}");

    // Every configuration problem at once, exit 2.
    let (code, log) = run(
        &["once"],
        &[
            ("HEALER_TOPIC_ENDPOINT", "http://topic.example/api/events"),
            ("HEALER_INTERVAL", "soon"),
            ("HEALER_SCHEMA", "xml"),
            ("HEALER_HEALTH_URL", "http://127.0.0.1:1/"),
            ("HEALER_HEALTH_COMMAND", "true"),
            // A check longer than systemd's watchdog (120 s, not fed while it runs) would have
            // a healthy but slow agent killed.
            ("HEALER_HEALTH_TIMEOUT", "300"),
        ],
    );
    assert_eq!(code, Some(2), "{log}");
    for needle in [
        "https://",
        "HEALER_INTERVAL",
        "HEALER_SCHEMA",
        "not both",
        "HEALER_HEALTH_TIMEOUT",
        "5 problem",
    ] {
        assert!(log.contains(needle), "missing {needle} in {log}");
    }
}

/// Issue 16, the VM side of a drain: a scheduled Terminate of this VM (a delete of a scale set
/// with terminate notifications) has the agent say DRAINING until the event's NotBefore at once,
/// set the drain file the load balancer's probe reads, run the drain command once, and approve
/// only its own event (approving one lets it proceed for every VM it names); a Freeze is only
/// reported; once the events are over, the agent reports health again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_termination_is_drained_approved_and_said() {
    let f = fixture(true).await;
    let scratch_marker = std::env::temp_dir().join(format!("drained-{}", uuid::Uuid::new_v4()));
    let command = format!("echo drained >> '{}'", scratch_marker.display());
    let agent = start_agent(
        f.imds_port,
        f.topic_port,
        &[("HEALER_DRAIN_COMMAND", command.as_str())],
    );
    until(&agent, 20, "a first UP", || {
        statuses(&f.topic.accepted()).contains(&"UP".to_string())
    })
    .await;
    let now = time::OffsetDateTime::now_utc();
    let not_before = (now + time::Duration::minutes(5))
        .replace_nanosecond(0)
        .unwrap();
    f.imds.schedule(
        "freeze-1",
        "Freeze",
        &["web_1"],
        now + time::Duration::minutes(15),
    );
    f.imds
        .schedule("other-1", "Terminate", &["web_2"], not_before);
    f.imds
        .schedule("term-1", "Terminate", &["WEB_1"], not_before);
    until(&agent, 20, "its own event approved", || {
        f.imds.approved() == ["term-1"]
    })
    .await;
    let events = f.topic.accepted();
    let draining = events
        .iter()
        .find(|e| e["data"]["status"] == "DRAINING")
        .cloned()
        .unwrap_or_else(|| panic!("no DRAINING heartbeat: {events:?}"));
    let until_sent = time::OffsetDateTime::parse(
        draining["data"]["until"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(until_sent, not_before, "until = the event's NotBefore");
    let answer = through_handler(&f.app, &draining).await;
    assert_eq!(answer["status"], "DRAINING", "{answer}");
    assert_eq!(
        std::fs::read_to_string(&scratch_marker).unwrap_or_default(),
        "drained\n"
    );
    let drain_file = agent.scratch.0.join("state/draining");
    assert!(
        std::fs::read_to_string(&drain_file)
            .unwrap_or_default()
            .starts_with("Terminate not before"),
        "the drain file is set: {:?}",
        std::fs::read_to_string(&drain_file)
    );
    // The event stays (started) for a while: DRAINING until the same NotBefore, the command run
    // once, nothing approved twice.
    let seen = f.topic.accepted().len();
    until(&agent, 20, "more heartbeats", || {
        f.topic.accepted().len() > seen + 2
    })
    .await;
    let later = f.topic.accepted().last().cloned().unwrap();
    assert_eq!(later["data"]["status"], "DRAINING", "{later}");
    assert_eq!(later["data"]["until"], draining["data"]["until"]);
    assert_eq!(
        std::fs::read_to_string(&scratch_marker).unwrap_or_default(),
        "drained\n"
    );
    assert_eq!(f.imds.approved(), ["term-1"]);
    assert!(
        agent.scratch.log().contains("Freeze"),
        "{}",
        agent.scratch.log()
    );

    // The events are over (a reboot or redeploy came back; a cancelled termination): health again.
    f.imds.clear_events();
    until(&agent, 20, "UP again", || {
        f.topic
            .accepted()
            .last()
            .map(|e| e["data"]["status"].clone())
            == Some(json!("UP"))
    })
    .await;
    assert!(!drain_file.exists(), "the drain file is removed");
    let _ = std::fs::remove_file(&scratch_marker);
}

/// Issue 16, end to end: the healer deletes a broken VM of a scale set with terminate
/// notifications; the real agent on it sees its Terminate event (the simulator's, through IMDS),
/// says DRAINING — which the healer takes as no fault — runs its drain command, approves the
/// event, and only then does the delete go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_deleted_by_a_repair_drains_first_and_is_not_counted_a_fault() {
    let app = spawn_app()
        .scale_set_spec(json!({"name": "web", "capacity": 3, "terminateNotificationSeconds": 600}))
        .env("HEALER_REPAIR_ACTIONS", "delete")
        .start()
        .await;
    let (status, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(status, 200, "{answer}");
    let vm = app.vm("web", 1).await;
    let imds = Imds::for_vm(
        &format!("{}/virtualMachines/1", scale_set_id("web")),
        vm["vm_id"].as_str().unwrap(),
        vm["computer_name"].as_str().unwrap(),
    );
    imds.inner.lock().unwrap().simulator = Some((app.sim_url.clone(), "web_1".into()));
    let topic = Topic::new(imds.clone());
    let (imds_port, topic_port) = (common::azurite::free_port(), common::azurite::free_port());
    serve(imds.clone().router(), imds_port).await;
    serve(topic.clone().router(), topic_port).await;
    // Only the real agent speaks for this VM.
    app.break_vm("web", 1, json!({"beat": "silent"})).await;
    let marker = std::env::temp_dir().join(format!("drained-{}", uuid::Uuid::new_v4()));
    let command = format!("echo drained >> '{}'", marker.display());
    let health = format!("http://127.0.0.1:{topic_port}/healthz");
    topic.set(|t| t.health = 500);
    let agent = start_agent(
        imds_port,
        topic_port,
        &[
            ("HEALER_HEALTH_URL", health.as_str()),
            ("HEALER_DRAIN_COMMAND", command.as_str()),
        ],
    );
    // Everything the agent publishes reaches the handler, as the topic's subscription would.
    let forwarded = std::cell::Cell::new(0usize);
    let forward = || async {
        let events = topic.accepted();
        for e in &events[forwarded.get()..] {
            through_handler(&app, e).await;
        }
        forwarded.set(events.len());
    };
    until(&agent, 20, "a DOWN heartbeat", || {
        statuses(&topic.accepted()).contains(&"DOWN".to_string())
    })
    .await;
    forward().await;
    app.heartbeat_round().await;
    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["repairs_requested"], 1,
        "the DOWN VM is deleted: {answer}"
    );
    until(&agent, 30, "a DRAINING heartbeat", || {
        statuses(&topic.accepted()).contains(&"DRAINING".to_string())
    })
    .await;
    forward().await;
    assert_eq!(
        app.stored_heartbeat("web", "1").await.status.label(),
        "DRAINING"
    );
    // The drain command ran, then the event was approved and the delete went on.
    until(&agent, 30, "the event approved", || {
        imds.approved().len() == 1
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap_or_default(),
        "drained\n"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        forward().await;
        app.invoke_timer("monitor-state").await;
        let (_, answer) = app.invoke_timer("monitor-status").await;
        assert_eq!(
            answer["ReturnValue"]["scale_sets"][0]["repairs_requested"], 0,
            "a draining VM is no fault: {answer}"
        );
        let (incidents, _) = app
            .store
            .incidents(&TestApp::scale_set("web"))
            .await
            .unwrap();
        if incidents["1"].value.state == vmss_healer::incident::State::Closed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the delete never ended: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.fleet("web").await["vms"].as_array().unwrap().len(), 2);
    let _ = std::fs::remove_file(&marker);
}

/// The Windows agent cannot run here (no PowerShell): it is held to the rules the Linux agent's
/// tests prove, by reading it.
#[test]
fn the_windows_agent_keeps_the_rules_it_cannot_be_run_against() {
    let agent = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/infra/agent/windows/vmss-healer-agent.ps1"
    ))
    .unwrap();
    let install = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/infra/agent/windows/install.ps1"
    ))
    .unwrap();
    // Under Set-StrictMode, reading .Response.StatusCode off an exception without a response
    // throws inside the catch: only the guarded helper reads it.
    assert!(agent.contains("Set-StrictMode -Version 3"));
    assert!(
        !agent.contains(".Response.StatusCode"),
        "status read unguarded"
    );
    // IMDS only through the proxy-free helper.
    assert!(
        !agent.contains("Invoke-RestMethod"),
        "IMDS through the default proxy"
    );
    assert_eq!(
        agent.matches("Invoke-Imds ").count(),
        5,
        "instance, token, attested document, scheduled events read and approved"
    );
    // Drains as the Linux agent does (issue 16): its own events only, the four kinds that take
    // the VM away, approved once drained, read between heartbeats too.
    assert!(agent.contains("$resources -notcontains $name"));
    assert!(agent.contains("-in @('Terminate', 'Reboot', 'Redeploy', 'Preempt')"));
    assert!(agent.contains("StartRequests = @(@{ EventId = $Id })"));
    assert!(agent.contains("$result.Status = 'DRAINING'"));
    assert!(agent.contains("try { Watch-Events } catch"));
    assert!(agent.contains("$request.Proxy = $null"));
    // The body as UTF-8 bytes, with the charset said.
    assert!(agent.contains("[System.Text.Encoding]::UTF8.GetBytes($message.Body)"));
    assert!(!agent.contains("ContentType = 'application/json' "));
    // The run loop survives whatever a heartbeat throws.
    assert!(agent.contains("try { Watch-Events; $null = Send-Heartbeat"));
    // Something restarts an agent that died after it started.
    assert!(
        install.contains("-RepetitionInterval") && install.contains("-MultipleInstances IgnoreNew")
    );
    // Issue 17: a golden image from a Windows VM is Sysprep's generalization, once, before the
    // settings are checked (it needs no topic), saying on one line that the VM needs a reimage.
    assert!(agent.contains("'/generalize', '/oobe', '/quit', '/mode:vm'"));
    assert!(agent.contains("-ne 'IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE'"));
    assert!(agent.contains("'vmss-healer-agent: machine-specific state cleared (sysprep generalize; reimage to serve again)'"));
    // Issue 18: STARTING until the data disk is mounted, checked before the health check.
    assert!(agent.contains("$result.Status = 'STARTING'"));
    assert!(agent.contains("[System.IO.FileAttributes]::ReparsePoint"));
    assert!(
        agent.find("$missing = @(Get-Unmounted)").unwrap()
            < agent.find("if ($HealthUrl) {").unwrap()
    );
    let prepare = agent.find("if ($Command -eq 'prepare-image')").unwrap();
    assert!(
        prepare
            < agent
                .find("# ---- settings, all problems at once ----")
                .unwrap()
    );
}

#[test]
fn the_installer_lays_out_a_service_systemd_accepts() {
    let scratch = Scratch::new();
    let root = scratch.0.join("root");
    let installer = concat!(env!("CARGO_MANIFEST_DIR"), "/infra/agent/install.sh");
    let command = r#"systemctl is-active --quiet "nginx" && test -d /srv\app"#;
    let out = Command::new("bash")
        .arg(installer)
        .args([
            "--topic",
            "https://heartbeats.westeurope-1.eventgrid.azure.net/api/events",
        ])
        .args(["--health-command", command, "--interval", "45"])
        .args(["--drain-command", "rm -f \"/srv/sample/healthz\""])
        .arg("--root")
        .arg(&root)
        .arg("--no-start")
        .output()
        .expect("run install.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    use std::os::unix::fs::PermissionsExt;
    let agent = root.join("usr/local/bin/vmss-healer-agent");
    let mode = std::fs::metadata(&agent).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
    assert_eq!(
        std::fs::read(&agent).unwrap(),
        std::fs::read(AGENT).unwrap(),
        "the installed agent is the repository's"
    );

    // The agent reads the environment file the unit uses, quotes and backslashes intact.
    let out = Command::new("bash")
        .arg(&agent)
        .arg("config")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HEALER_AGENT_ENV", root.join("etc/vmss-healer/agent.env"))
        .output()
        .unwrap();
    let config = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        config.contains("HEALER_DRAIN_COMMAND=rm -f \"/srv/sample/healthz\"\n"),
        "{config}"
    );
    assert!(
        config.contains(&format!("HEALER_HEALTH_COMMAND={command}\n")),
        "{config}"
    );
    assert!(config.contains("HEALER_INTERVAL=45.000\n"), "{config}");
    assert!(
        config.contains("HEALER_TOPIC_ENDPOINT=https://heartbeats.westeurope-1.eventgrid.azure.net/api/events?api-version=2018-01-01\n"),
        "{config}"
    );

    // systemd accepts the unit without a warning (pointed at the repository's agent, which exists
    // here where /usr/local/bin/vmss-healer-agent does not).
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/vmss-healer-agent.service"))
        .unwrap()
        .replace("/usr/local/bin/vmss-healer-agent", AGENT);
    for line in [
        "Type=notify",
        "NotifyAccess=all",
        "WatchdogSec=",
        "RestartPreventExitStatus=2",
    ] {
        assert!(unit.contains(line), "the unit lacks {line}");
    }
    let unit_path = scratch.0.join("vmss-healer-agent.service");
    std::fs::write(&unit_path, unit).unwrap();
    match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .output()
    {
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && stderr.trim().is_empty(),
                "systemd-analyze: {stderr}"
            );
        }
        Err(e) => eprintln!("systemd-analyze not available ({e}); unit checked by content only"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attested_heartbeats_prove_what_a_known_vm_id_cannot() {
    let ca = format!("{FIXTURES}/trusted-ca.pem");
    let f = fixture_with(
        true,
        &[
            ("HEALER_ATTESTATION_CA", ca.as_str()),
            ("HEALER_DOWN_PROOF", "attested"),
            ("HEALER_REPAIR_ACTIONS", "delete"),
        ],
    )
    .await;
    let set = TestApp::scale_set("web");
    // Where attestation is required, a heartbeat without a document proves too little to count,
    // UP or DOWN: the simulated agents' plain heartbeats are refused.
    f.app.heartbeat_round().await;
    let stored = f.app.store.heartbeat(&set, "0").await.unwrap();
    assert!(stored.is_none(), "{stored:?}");
    // The real agents of VMs 0 and 2 attest their UPs.
    let now = common::now_rfc3339(time::Duration::ZERO);
    let t =
        time::OffsetDateTime::parse(&now, &time::format_description::well_known::Rfc3339).unwrap();
    for i in [0, 2] {
        let vm_id = f.app.vm("web", i).await["vm_id"]
            .as_str()
            .unwrap()
            .to_string();
        let mut up = common::heartbeat_event("web", i, &vm_id, "UP", &now);
        up["data"]["attestation"] = json!(sign_document(
            "trusted",
            &imds_document(&vm_id, &t.unix_timestamp().to_string())
        ));
        let answer = through_handler(&f.app, &up).await;
        assert_eq!(answer["proof"], "attested", "{answer}");
    }
    f.app.clear_compute_calls().await;

    // The real VM 1 fails its check and says so with the platform's signature.
    let scratch = Scratch::new();
    let out = agent_command(
        &scratch,
        f.imds_port,
        f.topic_port,
        &[
            ("HEALER_ATTEST", "true"),
            ("HEALER_HEALTH_COMMAND", "exit 1"),
        ],
        &["once"],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let real = f.topic.accepted().last().cloned().unwrap();
    assert!(
        real["data"]["attestation"]
            .as_str()
            .is_some_and(|a| a.len() > 1000),
        "{real}"
    );
    let answer = through_handler(&f.app, &real).await;
    assert_eq!(
        (answer["status"].clone(), answer["proof"].clone()),
        (json!("DOWN"), json!("attested")),
        "{answer}"
    );

    // A forger who learned VM 2's vmId says VM 2 is DOWN: it proves too little to be believed.
    let vm2 = f.app.vm("web", 2).await["vm_id"]
        .as_str()
        .unwrap()
        .to_string();
    let now = common::now_rfc3339(time::Duration::ZERO);
    let forged = common::heartbeat_event("web", 2, &vm2, "DOWN", &now);
    let answer = through_handler(&f.app, &forged).await;
    assert_eq!(answer["reason"], "insufficient_proof", "{answer}");
    assert_eq!(
        f.app.stored_heartbeat("web", "2").await.status.label(),
        "UP"
    );

    // … replays VM 1's document for VM 2, or signs one with a look-alike chain: refused.
    let mut replayed = forged.clone();
    replayed["data"]["attestation"] = real["data"]["attestation"].clone();
    let answer = through_handler(&f.app, &replayed).await;
    assert_eq!(answer["reason"], "attestation_refused", "{answer}");
    assert!(
        answer["detail"]
            .as_str()
            .unwrap()
            .contains("is not the instance's"),
        "{answer}"
    );
    let t =
        time::OffsetDateTime::parse(&now, &time::format_description::well_known::Rfc3339).unwrap();
    let mut rogue = forged.clone();
    rogue["data"]["attestation"] = json!(sign_document(
        "rogue",
        &imds_document(&vm2, &t.unix_timestamp().to_string())
    ));
    let answer = through_handler(&f.app, &rogue).await;
    assert_eq!(answer["reason"], "attestation_refused", "{answer}");
    assert!(
        answer["detail"]
            .as_str()
            .unwrap()
            .contains("not issued by a trusted CA"),
        "{answer}"
    );

    // Only the attested DOWN is repaired.
    let (_, status) = f.app.invoke_timer("monitor-status").await;
    assert_eq!(
        status["ReturnValue"]["scale_sets"][0]["repairs_requested"], 1,
        "{status}"
    );
    let (journal, _) = f.app.recent_journal(&set).await;
    let repaired: Vec<&str> = journal
        .iter()
        .filter(|e| e.kind == vmss_healer::journal::EntryKind::Repair)
        .map(|e| e.instance_id.as_str())
        .collect();
    assert_eq!(repaired, ["1"], "{journal:?}");
}

/// Issue 14: the agent on a Flexible scale set's VM (IMDS gives a plain VM id, with the scale
/// set's name beside it) is heard, and its DOWN has that VM restarted through the VM API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flexible_vms_agent_is_heard_and_its_vm_repaired() {
    let app = spawn_app()
        .mode(common::Mode::Flexible)
        .scale_set("web", 3)
        .env("HEALER_REPAIR_ACTIONS", "restart")
        .start()
        .await;
    let (status, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(status, 200, "{answer}");
    let vm = app.vm("web", 1).await;
    let name = vm["name"].as_str().unwrap().to_string();
    let imds = Imds::for_vm(
        &app.resource_id_of("web", 1).await,
        vm["vm_id"].as_str().unwrap(),
        vm["computer_name"].as_str().unwrap(),
    );
    {
        let mut s = imds.inner.lock().unwrap();
        s.compute.insert("subscriptionId", common::SUB.into());
        s.compute.insert("resourceGroupName", common::RG.into());
        s.compute.insert("vmScaleSetName", "web".into());
        s.compute.insert("name", name.clone());
    }
    let topic = Topic::new(imds.clone());
    let (imds_port, topic_port) = (common::azurite::free_port(), common::azurite::free_port());
    serve(imds.clone().router(), imds_port).await;
    serve(topic.clone().router(), topic_port).await;
    // Only the agent speaks for this VM; the simulator's stand-in agents speak for the others.
    app.break_vm("web", 1, json!({"beat": "silent"})).await;
    let health = format!("http://127.0.0.1:{topic_port}/healthz");
    topic.set(|t| t.health = 500);
    let agent = start_agent(imds_port, topic_port, &[("HEALER_HEALTH_URL", &health)]);
    until(&agent, 20, "a DOWN heartbeat", || {
        topic
            .accepted()
            .iter()
            .any(|e| e["data"]["status"] == "DOWN")
    })
    .await;
    let down = topic
        .accepted()
        .into_iter()
        .find(|e| e["data"]["status"] == "DOWN")
        .unwrap();
    let answer = through_handler(&app, &down).await;
    assert_eq!(
        (answer["accepted"].clone(), answer["status"].clone()),
        (json!(true), json!("DOWN")),
        "{answer}"
    );
    assert_eq!(
        app.stored_heartbeat("web", &name.to_ascii_lowercase())
            .await
            .status
            .label(),
        "DOWN"
    );
    app.heartbeat_round().await;
    app.clear_compute_calls().await;
    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["repairs_requested"], 1,
        "{answer}"
    );
    let restarts: Vec<String> = app
        .compute_calls()
        .await
        .iter()
        .filter(|c| c["method"] == "POST")
        .map(|c| c["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(restarts.len(), 1, "{restarts:?}");
    assert!(
        restarts[0].ends_with(&format!("/virtualMachines/{name}/restart")),
        "{restarts:?}"
    );
}

/// Issue 17: `prepare-image` clears what makes the disk this machine's (cloud-init's state, the
/// machine id, the hostname, the SSH host keys) and the agent's own state, says so on one line the
/// healer reads from Run Command's output, needs no topic, and can run twice.
#[test]
fn prepare_image_clears_machine_state_and_can_run_twice() {
    use std::os::unix::fs::PermissionsExt;
    let scratch = Scratch::new();
    let root = scratch.0.join("root");
    for dir in ["etc/ssh", "var/lib/dbus"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::write(root.join("etc/machine-id"), "0123456789abcdef\n").unwrap();
    std::fs::write(root.join("var/lib/dbus/machine-id"), "0123456789abcdef\n").unwrap();
    std::fs::write(root.join("etc/hostname"), "web000001\n").unwrap();
    std::fs::write(root.join("etc/ssh/ssh_host_ed25519_key"), "secret").unwrap();
    std::fs::write(root.join("etc/ssh/ssh_host_ed25519_key.pub"), "public").unwrap();
    std::fs::write(root.join("etc/ssh/sshd_config"), "PermitRootLogin no\n").unwrap();
    let state = scratch.0.join("state");
    for f in ["maintenance-until", "draining", "event-1.seen", "keep-me"] {
        std::fs::write(state.join(f), "x").unwrap();
    }
    // cloud-init, as the agent finds it on PATH: records how it was asked.
    let cloud_init = scratch.0.join("bin/cloud-init");
    std::fs::write(
        &cloud_init,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\n",
            scratch.0.join("cloud-init.calls").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cloud_init, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = || {
        Command::new("bash")
            .arg(AGENT)
            .arg("prepare-image")
            .env_clear()
            .env(
                "PATH",
                format!("{}:/usr/bin:/bin", scratch.0.join("bin").display()),
            )
            .env("HEALER_AGENT_ENV", scratch.0.join("no-such.env"))
            .env("HEALER_ROOT", &root)
            .env("HEALER_STATE_DIR", &state)
            .output()
            .unwrap()
    };
    let first = run();
    let out = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(
        out.trim(),
        "vmss-healer-agent: machine-specific state cleared (cloud-init,machine-id,hostname)"
    );
    assert_eq!(
        std::fs::read_to_string(scratch.0.join("cloud-init.calls")).unwrap(),
        "clean --logs\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/machine-id")).unwrap(),
        "",
        "empty, not gone"
    );
    assert!(!root.join("var/lib/dbus/machine-id").exists());
    assert_eq!(
        std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
        "localhost\n"
    );
    assert!(!root.join("etc/ssh/ssh_host_ed25519_key").exists());
    assert!(!root.join("etc/ssh/ssh_host_ed25519_key.pub").exists());
    assert!(
        root.join("etc/ssh/sshd_config").exists(),
        "only the host keys go"
    );
    let left: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        vec!["keep-me".to_string()],
        "only the agent's own files go"
    );

    let second = run();
    assert!(second.status.success());
    assert!(String::from_utf8_lossy(&second.stdout).contains("machine-specific state cleared"));

    // A cloud-init that fails stops it with an error: the image would keep this VM's provisioning.
    std::fs::write(&cloud_init, "#!/bin/sh\nexit 3\n").unwrap();
    let failed = run();
    assert!(!failed.status.success());
    assert!(String::from_utf8_lossy(&failed.stderr).contains("cloud-init clean failed"));
}

/// Issue 18, the VM side of a stateful replacement: with `HEALER_REQUIRE_MOUNT`, the agent says
/// STARTING (not UP, not DOWN) until every path named is a mount point — the application starts
/// only with its data, the analogue of a lifecycle hook's CONTINUE — and the handler takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_waits_for_its_data_disk_before_it_says_up() {
    let f = fixture(true).await;
    let scratch = Scratch::new();
    let run = |env: &[(&str, &str)]| {
        let out = agent_command(&scratch, f.imds_port, f.topic_port, env, &["once"])
            .output()
            .expect("run the agent");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let data = scratch.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let data = data.to_str().unwrap().to_string();
    // A directory that is not a mount point: the disk is not there yet, whatever the check says.
    let (code, log) = run(&[
        ("HEALER_REQUIRE_MOUNT", &format!("/ {data}")),
        ("HEALER_HEALTH_COMMAND", "exit 3"),
    ]);
    assert_eq!(code, Some(0), "{log}");
    let event = f.topic.accepted().last().cloned().unwrap();
    assert_eq!(event["data"]["status"], "STARTING", "{event}");
    assert!(
        event["data"]["detail"].as_str().unwrap().contains(&data),
        "{event}"
    );
    let answer = through_handler(&f.app, &event).await;
    assert_eq!(answer["status"], "STARTING", "{answer}");
    // Mounted (the root always is): the health check decides again.
    let (code, log) = run(&[
        ("HEALER_REQUIRE_MOUNT", "/"),
        ("HEALER_HEALTH_COMMAND", "true"),
    ]);
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(f.topic.accepted().last().unwrap()["data"]["status"], "UP");
    // A relative path is a mistake, said at once.
    let (code, log) = run(&[("HEALER_REQUIRE_MOUNT", "data")]);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("HEALER_REQUIRE_MOUNT"), "{log}");
}
