//! The Compute simulator behaves like ARM where the handler depends on it, and what it reports
//! reaches the mirror through the real azure_mgmt_compute client.

mod common;

use common::{scale_set_id, spawn_app, TestApp, IDENTITY_SECRET};
use serde_json::{json, Value};

async fn token(app: &TestApp) -> String {
    let r: Value = app
        .http
        .get(format!(
            "{}/msi/token?api-version=2019-08-01&resource=https://management.azure.com",
            app.sim_url
        ))
        .header("X-IDENTITY-HEADER", IDENTITY_SECRET)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["access_token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm_rules_auth_api_version_and_async_operations() {
    let app = spawn_app().scale_set("web", 3).start().await;
    let url = format!("{}{}", app.sim_url, scale_set_id("web"));

    let no_secret = app
        .http
        .get(format!("{}/msi/token?resource=x", app.sim_url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        no_secret.status(),
        401,
        "the identity endpoint checks X-IDENTITY-HEADER"
    );

    let anonymous = app
        .http
        .get(format!("{url}?api-version=2024-07-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let forged = app
        .http
        .get(format!("{url}?api-version=2024-07-01"))
        .bearer_auth("made-up")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    let body: Value = forged.json().await.unwrap();
    assert_eq!(body["error"]["code"], "InvalidAuthenticationToken");

    let bearer = token(&app).await;
    let old_api = app
        .http
        .get(format!("{url}?api-version=2019-07-01"))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(old_api.status(), 400);
    let missing = app
        .http
        .get(format!("{url}/virtualMachines/99?api-version=2024-07-01"))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // Case-insensitive paths, a 202 with Azure-AsyncOperation, and an operation that can be polled.
    let restart = app
        .http
        .post(format!(
            "{}/restart?api-version=2024-07-01",
            url.to_uppercase().replace("HTTP://", "http://")
        ))
        .bearer_auth(&bearer)
        .json(&json!({"instanceIds": ["1"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(restart.status(), 202);
    let operation = restart.headers()["azure-asyncoperation"]
        .to_str()
        .unwrap()
        .to_string();
    let status: Value = app
        .http
        .get(&operation)
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["status"], "Succeeded");

    let bad_ids = app
        .http
        .post(format!("{url}/delete?api-version=2024-07-01"))
        .bearer_auth(&bearer)
        .json(&json!({"instanceIds": ["42"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_ids.status(), 400);
    assert_eq!(
        app.fleet("web").await["capacity"],
        json!(3),
        "a rejected delete deletes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_view_details_reach_the_mirror() {
    let app = spawn_app().scale_set("web", 3).start().await;
    app.break_vm("web", 0, json!({"health": "unhealthy"})).await;
    app.break_vm(
        "web",
        1,
        json!({"protectFromScaleSetActions": true, "powerState": "deallocated"}),
    )
    .await;
    let (status, _) = app.invoke_timer("monitor-state").await;
    assert_eq!(status, 200);
    let set = TestApp::scale_set("web");
    let zero = app
        .store
        .mirrored_instance(&set, "0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(zero.health.map(|h| h.as_str()), Some("unhealthy"));
    assert!(zero.created_at.is_some(), "timeCreated is mirrored");
    assert_eq!(
        zero.vm_id.as_deref(),
        app.vm("web", 0).await["vm_id"].as_str()
    );
    assert_eq!(zero.computer_name.as_deref(), Some("web000000"));
    let one = app
        .store
        .mirrored_instance(&set, "1")
        .await
        .unwrap()
        .unwrap();
    assert!(one.protected_from_scale_set_actions);
    assert_eq!(one.power_state.as_deref(), Some("deallocated"));
    assert_eq!(
        one.health, None,
        "no Application Health extension, no health state"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_keep_the_last_mirror_and_say_why() {
    let app = spawn_app().scale_set("web", 3).start().await;
    let set = TestApp::scale_set("web");
    app.invoke_timer("monitor-state").await;

    // One 5xx on a read is retried within the pass.
    app.inject_fault(json!({"status": 503, "method": "GET", "count": 1}))
        .await;
    let (_, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["outcome"], "synced",
        "{answer}"
    );

    // A persistent one fails the scale set's sync, not the pass, and keeps the mirror.
    app.inject_fault(json!({"status": 500, "method": "GET", "count": 2}))
        .await;
    let (status, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["outcome"], "transient",
        "{answer}"
    );
    assert_eq!(app.store.mirror(&set).await.unwrap().0.len(), 3);
    let record = app.store.scale_set(&set).await.unwrap().unwrap();
    assert!(record.sync_error.unwrap().contains("500"));
    // Once the fault passes, the next pass syncs and clears the error.
    app.invoke_timer("monitor-state").await;
    assert_eq!(
        app.store.scale_set(&set).await.unwrap().unwrap().sync_error,
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_spent_read_budget_defers_the_rest_of_a_pass_and_catches_up_next() {
    let app = spawn_app()
        .scale_set("a", 2)
        .scale_set("b", 2)
        .scale_set("c", 2)
        .start()
        .await;
    app.admin(
        reqwest::Method::PUT,
        "ratelimit",
        Some(json!({"remaining": 5})),
    )
    .await;
    let (_, answer) = app.invoke_timer("monitor-state").await;
    let outcomes: Vec<&str> = answer["ReturnValue"]["scale_sets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["synced", "deferred", "deferred"], "{answer}");
    assert!(answer["ReturnValue"]["scale_sets"][1]["detail"]
        .as_str()
        .unwrap()
        .contains("5 left"));

    // The budget recovers: the deferred scale sets go first, and all are synced.
    app.admin(
        reqwest::Method::PUT,
        "ratelimit",
        Some(json!({"remaining": 1000})),
    )
    .await;
    app.clear_compute_calls().await;
    let (_, answer) = app.invoke_timer("monitor-state").await;
    let outcomes: Vec<&str> = answer["ReturnValue"]["scale_sets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["synced", "synced", "synced"], "{answer}");
    let first_read = app.compute_calls().await[0]["path"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        !first_read.ends_with("/virtualMachineScaleSets/a"),
        "a was synced last time; {first_read} went first"
    );
}
