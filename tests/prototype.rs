//! Golden images (issue 17): the Compute edge's calls against the simulator, driven by the real
//! `azure_mgmt_compute` clients.

mod common;

use common::{spawn_app, TestApp, IDENTITY_SECRET};
use std::sync::Arc;
use vmss_healer::compute::{Compute, ComputeError, ImageRef, OperationRef, OperationState};

/// The simulator's managed-identity endpoint, as a credential (the handler's own reads it from
/// the process environment, which tests running side by side cannot share).
#[derive(Debug)]
struct SimulatorIdentity {
    url: String,
    http: reqwest::Client,
}

#[async_trait::async_trait]
impl azure_core::auth::TokenCredential for SimulatorIdentity {
    async fn get_token(
        &self,
        _scopes: &[&str],
    ) -> azure_core::Result<azure_core::auth::AccessToken> {
        let answer: serde_json::Value = self
            .http
            .get(format!(
                "{}/msi/token?api-version=2019-08-01&resource=https://management.azure.com",
                self.url
            ))
            .header("X-IDENTITY-HEADER", IDENTITY_SECRET)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| azure_core::Error::new(azure_core::error::ErrorKind::Credential, e))?
            .json()
            .await
            .map_err(|e| azure_core::Error::new(azure_core::error::ErrorKind::Credential, e))?;
        Ok(azure_core::auth::AccessToken::new(
            answer["access_token"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            time::OffsetDateTime::now_utc() + time::Duration::minutes(30),
        ))
    }

    async fn clear_cache(&self) -> azure_core::Result<()> {
        Ok(())
    }
}

fn compute(app: &TestApp) -> Compute {
    let credential = Arc::new(SimulatorIdentity {
        url: app.sim_url.clone(),
        http: app.http.clone(),
    });
    Compute::new(
        &url::Url::parse(&app.sim_url).unwrap(),
        credential,
        std::time::Duration::from_secs(10),
    )
    .unwrap()
}

async fn state(
    compute: &Compute,
    accepted: &vmss_healer::compute::Accepted,
) -> (OperationState, Option<String>) {
    let op: &OperationRef = accepted.operation.as_ref().expect("an operation to follow");
    let status = compute.operation_status(op).await.unwrap();
    (status.state, status.output)
}

/// Every call of a capture, in order, against the simulator: the instance's disk, Run Command
/// with its output, deallocate, snapshot, gallery and definition made once, a version followed
/// until it is done, listed and deleted, the model pointed at the definition — refused for a set
/// on a platform image, as Azure refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_calls_a_golden_image_takes_work_against_the_simulator() {
    let definition = format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/galleries/sig_fleet/images/api-prototype",
        common::SUB,
        common::RG
    );
    let app = spawn_app()
        .scale_set("web", 2)
        .scale_set_spec(serde_json::json!({"name": "api", "capacity": 2, "imageReference": {"id": format!("{definition}/versions/1.0.0")}}))
        .start()
        .await;
    let compute = compute(&app);
    let (web, api) = (TestApp::scale_set("web"), TestApp::scale_set("api"));
    assert!(
        matches!(compute.scale_set(&web).await.unwrap().image, Some(ImageRef::Platform(p)) if p.starts_with("Canonical:"))
    );
    assert!(matches!(
        compute.scale_set(&api).await.unwrap().image,
        Some(ImageRef::Custom(_))
    ));

    let disk = compute.instance_disk(&api, "0").await.unwrap();
    assert!(disk.os_disk.contains("/disks/api_0_OsDisk_1_"), "{disk:?}");
    assert_eq!(
        (disk.os_type.as_str(), disk.hyper_v_generation.as_deref()),
        ("Linux", Some("V2"))
    );

    let script = vec!["/opt/vmss-healer/vmss-healer-agent prepare-image".to_string()];
    let ran = compute
        .run_command(&api, "0", &script, false)
        .await
        .unwrap();
    let (done, output) = state(&compute, &ran).await;
    assert_eq!(done, OperationState::Succeeded);
    assert!(output
        .unwrap_or_default()
        .contains("machine-specific state cleared"));
    let stopped = compute.deallocate_instance(&api, "0").await.unwrap();
    assert_eq!(state(&compute, &stopped).await.0, OperationState::Succeeded);
    assert_eq!(app.vm("api", 0).await["power_state"], "deallocated");

    let snap = compute
        .create_snapshot(&api, "api-0-prototype", "westeurope", &disk.os_disk)
        .await
        .unwrap();
    assert_eq!(state(&compute, &snap).await.0, OperationState::Succeeded);
    let snapshot_id = format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/snapshots/api-0-prototype",
        common::SUB,
        common::RG
    );
    for _ in 0..2 {
        compute
            .ensure_gallery(&api, "sig_fleet", "westeurope")
            .await
            .unwrap();
        compute
            .ensure_image_definition(
                &api,
                "sig_fleet",
                "api-prototype",
                "westeurope",
                "Linux",
                "V2",
                "x64",
            )
            .await
            .unwrap();
    }
    // A definition of another OS is not this set's.
    let mismatch = compute
        .ensure_image_definition(
            &api,
            "sig_fleet",
            "api-prototype",
            "westeurope",
            "Windows",
            "V2",
            "x64",
        )
        .await
        .unwrap_err();
    assert!(
        matches!(mismatch, ComputeError::Refused(ref e) if e.code == "ImageDefinitionMismatch"),
        "{mismatch}"
    );

    app.admin(
        reqwest::Method::PUT,
        "artifacts/delay",
        Some(serde_json::json!({"ms": 3_600_000})),
    )
    .await;
    let version = compute
        .create_image_version(
            &api,
            "sig_fleet",
            "api-prototype",
            "2026.12.1",
            "westeurope",
            &snapshot_id,
            "Standard_ZRS",
        )
        .await
        .unwrap();
    assert_eq!(
        state(&compute, &version).await.0,
        OperationState::InProgress,
        "versions take their time"
    );
    let listed = compute
        .image_versions(&api, "sig_fleet", "api-prototype")
        .await
        .unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|v| (v.name.as_str(), v.provisioning_state.as_deref()))
            .collect::<Vec<_>>(),
        vec![("2026.12.1", Some("Creating"))]
    );
    app.admin(reqwest::Method::POST, "artifacts/complete", None)
        .await;
    assert_eq!(state(&compute, &version).await.0, OperationState::Succeeded);

    // The model follows the definition (its latest version); a platform-image set cannot.
    compute.set_image(&api, &definition).await.unwrap();
    assert_eq!(
        compute.scale_set(&api).await.unwrap().image,
        Some(ImageRef::Custom(definition.clone()))
    );
    assert_eq!(
        app.vm("api", 1).await["latest_model_applied"],
        false,
        "a new model"
    );
    let refused = compute.set_image(&web, &definition).await.unwrap_err();
    assert!(
        matches!(refused, ComputeError::Refused(ref e) if e.code == "OperationNotAllowed"),
        "{refused}"
    );

    let gone = compute
        .delete_image_version(&api, "sig_fleet", "api-prototype", "2026.12.1")
        .await
        .unwrap();
    assert_eq!(state(&compute, &gone).await.0, OperationState::Succeeded);
    assert!(compute
        .image_versions(&api, "sig_fleet", "api-prototype")
        .await
        .unwrap()
        .is_empty());
    let deleted = compute
        .delete_snapshot(&api, "api-0-prototype")
        .await
        .unwrap();
    assert_eq!(state(&compute, &deleted).await.0, OperationState::Succeeded);
}
