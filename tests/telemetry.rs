//! Issue 13: traces, logs and metrics reach Application Insights. A local collector stands for
//! the ingestion endpoint (`POST {IngestionEndpoint}/v2.1/track`, a gzipped JSON array of
//! envelopes, answered with `itemsReceived`/`itemsAccepted`), and the handler is configured as
//! the Function App configures it: a connection string and `Authorization=AAD`.

mod common;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router};
use common::azurite::free_port;
use common::{heartbeat_event, now_rfc3339, spawn_app, IDENTITY_SECRET};
use serde_json::{json, Value};
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmss_healer::telemetry::DIMENSIONS;

/// One upload: its `Authorization` header and its body, unzipped.
type Upload = (Option<String>, String);

/// What the collector received.
#[derive(Clone, Default)]
struct Received {
    uploads: Arc<Mutex<Vec<Upload>>>,
}

impl Received {
    fn envelopes(&self) -> Vec<Value> {
        let uploads = self.uploads.lock().unwrap();
        uploads
            .iter()
            .flat_map(|(_, body)| {
                serde_json::from_str::<Vec<Value>>(body).expect("an upload is a JSON array")
            })
            .collect()
    }

    fn raw(&self) -> String {
        let uploads = self.uploads.lock().unwrap();
        uploads
            .iter()
            .map(|(_, b)| b.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn authorizations(&self) -> Vec<Option<String>> {
        self.uploads
            .lock()
            .unwrap()
            .iter()
            .map(|(a, _)| a.clone())
            .collect()
    }

    /// Waits until the envelopes satisfy `done`; fails with what arrived after `limit`.
    async fn wait_for(&self, what: &str, limit: Duration, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            let envelopes = self.envelopes();
            if done(&envelopes) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not received within {limit:?}; got {} envelopes:\n{}",
                envelopes.len(),
                serde_json::to_string_pretty(&envelopes).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn track(State(r): State<Received>, headers: HeaderMap, body: Bytes) -> Json<Value> {
    let mut text = String::new();
    let gzip = headers
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes() == b"gzip");
    if gzip {
        flate2::read::GzDecoder::new(&body[..])
            .read_to_string(&mut text)
            .expect("a gzip body");
    } else {
        text = String::from_utf8(body.to_vec()).expect("a UTF-8 body");
    }
    let n = serde_json::from_str::<Vec<Value>>(&text).map_or(0, |v| v.len());
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    r.uploads.lock().unwrap().push((auth, text));
    Json(json!({"itemsReceived": n, "itemsAccepted": n, "errors": []}))
}

/// A collector on a free port; returns its connection-string endpoint and what it receives.
async fn collector() -> (String, Received) {
    let received = Received::default();
    let port = free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the collector");
    let app = Router::new()
        .route("/v2.1/track", post(track))
        .with_state(received.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://127.0.0.1:{port}"), received)
}

const KEY: &str = "00000000-0000-4000-8000-0000000000aa";

fn connection_string(endpoint: &str) -> String {
    format!(
        "InstrumentationKey={KEY};IngestionEndpoint={endpoint}/;LiveEndpoint=https://live.example/"
    )
}

fn base_type(e: &Value) -> &str {
    e["data"]["baseType"].as_str().unwrap_or("")
}

fn metric<'a>(envelopes: &'a [Value], name: &str) -> Vec<&'a Value> {
    envelopes
        .iter()
        .filter(|e| base_type(e) == "MetricData")
        .filter(|e| e["data"]["baseData"]["metrics"][0]["name"] == name)
        .collect()
}

fn prop<'a>(e: &'a Value, key: &str) -> &'a str {
    e["data"]["baseData"]["properties"][key]
        .as_str()
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_reaches_application_insights_as_logs_spans_and_metrics() {
    let (endpoint, received) = collector().await;
    let app = spawn_app()
        .scale_set("web", 4)
        .env(
            "APPLICATIONINSIGHTS_CONNECTION_STRING",
            &connection_string(&endpoint),
        )
        .env(
            "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
            "Authorization=AAD",
        )
        .env("HEALER_REPAIR_ACTIONS", "restart")
        // Standard OpenTelemetry variables: export within a test's patience.
        .env("OTEL_METRIC_EXPORT_INTERVAL", "300")
        .env("OTEL_BLRP_SCHEDULE_DELAY", "100")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start()
        .await;
    app.sync_and_break("web", 2, json!({"beat": "down"})).await;
    app.drive_until("web", Duration::from_secs(20), |j| {
        j.iter().any(|e| e.kind.as_str() == "repair")
    })
    .await;
    // A malformed event: a warning, with its reason as a field.
    let (status, _) = app
        .deliver_event(json!({"id": "x", "eventType": "VmHeartbeat", "subject": "not a vm", "data": {}, "eventTime": now_rfc3339(time::Duration::ZERO), "dataVersion": "1"}))
        .await;
    assert_eq!(status, 200);

    let set = common::TestApp::key("web");
    received
        .wait_for(
            "a requested repair, counted",
            Duration::from_secs(15),
            |e| {
                metric(e, "healer.repairs").iter().any(|m| {
                    prop(m, "scale_set") == set
                        && prop(m, "action") == "restart"
                        && prop(m, "kind") == "repair"
                        && prop(m, "outcome") == "requested"
                })
            },
        )
        .await;
    received
        .wait_for(
            "the unhealthy count, per scale set",
            Duration::from_secs(15),
            |e| {
                metric(e, "healer.instances.unhealthy").iter().any(|m| {
                    prop(m, "scale_set") == set
                        && m["data"]["baseData"]["metrics"][0]["value"] == 1.0
                })
            },
        )
        .await;
    received
        .wait_for(
            "pass durations, mirror passes and Compute calls",
            Duration::from_secs(15),
            |e| {
                metric(e, "healer.pass.duration")
                    .iter()
                    .any(|m| prop(m, "function") == "monitor-status" && prop(m, "result") == "ok")
                    && metric(e, "healer.mirror.passes")
                        .iter()
                        .any(|m| prop(m, "scale_set") == set && prop(m, "outcome") == "synced")
                    && metric(e, "healer.compute.calls").iter().any(|m| {
                        prop(m, "operation")
                            == "Microsoft.Compute/virtualMachineScaleSets/restart/action"
                            && prop(m, "status") == "202"
                    })
            },
        )
        .await;
    // Logs keep their severity and fields: the repair at Information, the rejection a Warning.
    received
        .wait_for(
            "the decision and the rejection as log records",
            Duration::from_secs(15),
            |e| {
                let messages: Vec<&Value> =
                    e.iter().filter(|e| base_type(e) == "MessageData").collect();
                messages.iter().any(|m| {
                    m["data"]["baseData"]["severityLevel"] == 1
                        && m["data"]["baseData"]["message"] == "repair decided"
                        && prop(m, "action") == "restart"
                        && prop(m, "instance") == "2"
                }) && messages
                    .iter()
                    .any(|m| m["data"]["baseData"]["severityLevel"] == 2)
            },
        )
        .await;
    // Each invocation is a request, each Compute call a dependency under it.
    received
        .wait_for("requests and dependencies", Duration::from_secs(15), |e| {
            e.iter().any(|e| {
                base_type(e) == "RequestData" && e["data"]["baseData"]["name"] == "monitor-status"
            }) && e.iter().any(|e| {
                base_type(e) == "RemoteDependencyData"
                    && e["data"]["baseData"]["name"]
                        .as_str()
                        .is_some_and(|n| n.contains("virtualMachineScaleSets/restart/action"))
            })
        })
        .await;
    // An operator's pause is a brake held; a 429 a throttle, counted per subscription.
    let (code, _, err) = app.cli(&["pause", "web", "--reason", "telemetry test"]);
    assert_eq!(code, 0, "{err}");
    let (status, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(status, 200, "{answer}");
    app.inject_fault(json!({"status": 429, "retryAfter": 1, "method": "GET", "count": 1}))
        .await;
    app.invoke_timer("monitor-state").await;
    received
        .wait_for("the brake and the throttle", Duration::from_secs(15), |e| {
            metric(e, "healer.brake.held_seconds")
                .iter()
                .any(|m| prop(m, "scale_set") == set && prop(m, "brake") == "paused_by_operator")
                && metric(e, "healer.compute.throttles")
                    .iter()
                    .any(|m| prop(m, "subscription") == common::SUB.to_lowercase())
        })
        .await;
    // Every metric carries exactly the dimensions the alerts and the workbook may read.
    for e in received
        .envelopes()
        .iter()
        .filter(|e| base_type(e) == "MetricData")
    {
        let name = e["data"]["baseData"]["metrics"][0]["name"]
            .as_str()
            .unwrap();
        let (_, dims) = DIMENSIONS
            .iter()
            .find(|(m, _)| *m == name)
            .unwrap_or_else(|| panic!("`{name}` is not in telemetry::METRICS"));
        let keys: std::collections::BTreeSet<&str> = e["data"]["baseData"]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            // Resource attributes (service.name, telemetry.sdk.*) ride along on every item.
            .filter(|k| !k.contains('.'))
            .collect();
        assert_eq!(keys, dims.iter().copied().collect(), "{name}: {e}");
    }
    // Every upload carried the app identity's token, for a resource with local auth disabled.
    let auths = received.authorizations();
    assert!(!auths.is_empty());
    for auth in &auths {
        let auth = auth.as_deref().unwrap_or("");
        assert!(auth.starts_with("Bearer sim-"), "{auth}");
    }
    for e in received.envelopes() {
        assert_eq!(e["iKey"], KEY, "{e}");
    }
    assert!(!received.raw().contains(IDENTITY_SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_never_carry_a_secret_the_logs_would_have_redacted() {
    // Storage reached with a SAS that cannot be reached: every error quotes its URL, SAS and all.
    const SIG: &str = "dGVsZW1ldHJ5LXNpZ25hdHVyZS10aGF0LW11c3Qtc3RheS1zZWNyZXQ%3D";
    let storage = format!(
        "TableEndpoint=http://127.0.0.1:{}/devstoreaccount1;SharedAccessSignature=sv=2023-11-03&ss=t&srt=sco&sp=rwdlacu&se=2099-01-01T00:00:00Z&sig={SIG}",
        free_port()
    );
    let (endpoint, received) = collector().await;
    let app = spawn_app()
        .scale_set("web", 2)
        .env("HEALER_STORAGE", &storage)
        .env(
            "APPLICATIONINSIGHTS_CONNECTION_STRING",
            &connection_string(&endpoint),
        )
        .env("OTEL_METRIC_EXPORT_INTERVAL", "300")
        .env("OTEL_BLRP_SCHEDULE_DELAY", "100")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start()
        .await;
    let vm_id = app.vm("web", 1).await["vm_id"]
        .as_str()
        .unwrap()
        .to_string();
    for function in ["monitor-state", "monitor-status"] {
        let (status, _) = app.invoke_timer(function).await;
        assert_eq!(status, 503);
    }
    let (status, _) = app
        .deliver_event(heartbeat_event(
            "web",
            1,
            &vm_id,
            "DOWN",
            &now_rfc3339(time::Duration::ZERO),
        ))
        .await;
    assert_eq!(status, 503);
    // Text from outside that quotes secrets: a SAS by its shape, the identity header by its
    // value. Logged raw in the event's fields; the log writer and the uplink both mask it.
    let (status, _) = app
        .deliver_event(json!({"id": "forged", "eventType": format!("Forged.Type?x=1&sig={SIG}&h={IDENTITY_SECRET}"),
            "subject": "/s", "data": {}, "eventTime": now_rfc3339(time::Duration::ZERO), "dataVersion": "1"}))
        .await;
    assert_eq!(status, 200);
    received
        .wait_for(
            "the forged event's rejection",
            Duration::from_secs(15),
            |e| {
                e.iter().any(|e| {
                    e["data"]["baseData"]["message"] == "event rejected"
                        && prop(e, "error").contains("Forged.Type")
                })
            },
        )
        .await;
    received
        .wait_for(
            "the storage errors, as error records",
            Duration::from_secs(15),
            |e| {
                e.iter()
                    .filter(|e| {
                        base_type(e) == "MessageData" && e["data"]["baseData"]["severityLevel"] == 3
                    })
                    .filter(|e| e.to_string().contains("devstoreaccount1"))
                    .count()
                    >= 3
            },
        )
        .await;
    received
        .wait_for(
            "the failed invocations, counted",
            Duration::from_secs(15),
            |e| {
                metric(e, "healer.pass.duration").iter().any(|m| {
                    prop(m, "function") == "monitor-state" && prop(m, "result") == "transient"
                })
            },
        )
        .await;
    let raw = received.raw();
    for secret in [
        SIG,
        "dGVsZW1ldHJ5LXNpZ25hdHVyZS10aGF0LW11c3Qtc3RheS1zZWNyZXQ=",
        IDENTITY_SECRET,
    ] {
        assert!(
            !raw.contains(secret),
            "an upload quotes a secret ({secret})"
        );
    }
    assert!(raw.contains("REDACTED"), "the errors were uploaded, masked");
    // No Entra authentication configured: uploads carry the key alone.
    assert!(received.authorizations().iter().all(Option::is_none));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_connection_string_is_reported_and_the_healer_runs() {
    for (value, says) in [
        (
            "@Microsoft.KeyVault(SecretUri=https://kv.vault.azure.net/secrets/ai/)",
            "Key Vault reference",
        ),
        (
            "IngestionEndpoint=https://x.in.applicationinsights.azure.com/",
            "no InstrumentationKey",
        ),
        (
            "InstrumentationKey=k;IngestionEndpoint=http://collector.example/",
            "must be https",
        ),
    ] {
        let app = spawn_app()
            .scale_set("web", 2)
            .env("APPLICATIONINSIGHTS_CONNECTION_STRING", value)
            .start()
            .await;
        let (status, answer) = app.invoke_timer("monitor-state").await;
        assert_eq!(status, 200, "{value}: {answer}");
        let (status, answer) = app.invoke_timer("monitor-status").await;
        assert_eq!(status, 200, "{value}: {answer}");
        let line = app.wait_for_log(says, Duration::from_secs(10)).await;
        assert!(
            line.contains("traces and metrics are not exported"),
            "{line}"
        );
        let (code, out, err) = app.cli(&["status"]);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains(says),
            "`handler status` does not report it:\n{out}"
        );
    }
}
