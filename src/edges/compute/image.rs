//! The calls a golden image takes (issue 17), through the Compute SDK's own clients (their paths
//! and api-versions: snapshots the disk provider's 2024-03-02, galleries the gallery provider's
//! 2023-07-03): read an instance's OS disk, run a command in it, deallocate it, snapshot the disk,
//! make sure the gallery and the image definition exist, create, list and delete image versions,
//! point the scale set's model at an image. Each write that Azure runs for long answers with the
//! operation to follow ([`Accepted`]); the bodies are built as the REST reference writes them.

use super::{Accepted, ArmError, Compute, ComputeError, ImageRef};
use crate::scaleset::ScaleSetId;
use azure_mgmt_compute::package_2024_07_01::models;
use futures::StreamExt;
use serde_json::json;

/// What a golden image takes from the instance it is captured from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceDisk {
    /// The managed OS disk's id.
    pub os_disk: String,
    /// `Linux` or `Windows`.
    pub os_type: String,
    /// `V1` or `V2`, from the instance view.
    pub hyper_v_generation: Option<String>,
    /// `x64` or `Arm64`, from the VM size.
    pub architecture: String,
}

/// A VM size's architecture: Azure's Arm64 sizes carry `p` among their feature letters
/// (`Standard_D2ps_v5`, `Standard_E4pds_v5`; "Azure VM sizes naming conventions": p = ARM-based).
pub fn architecture_of(size: &str) -> &'static str {
    let family = size
        .trim_start_matches("Standard_")
        .split('_')
        .next()
        .unwrap_or("");
    let features = family.trim_start_matches(|c: char| c.is_ascii_alphabetic());
    let features = features.trim_start_matches(|c: char| c.is_ascii_digit() || c == '-');
    if features.contains('p') {
        "Arm64"
    } else {
        "x64"
    }
}

/// One version of an image definition, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageVersion {
    pub name: String,
    pub id: String,
    /// `Creating`, `Succeeded`, `Failed`, …
    pub provisioning_state: Option<String>,
}

/// Builds an SDK model from the JSON the REST reference shows: the SDK's models are the REST
/// bodies, and this keeps the request readable.
pub(super) fn model<T: serde::de::DeserializeOwned>(
    what: &str,
    v: serde_json::Value,
) -> Result<T, ComputeError> {
    serde_json::from_value(v).map_err(|e| ComputeError::Failed(format!("{what}: {e}")))
}

impl Compute {
    /// The instance's OS disk, OS type and Hyper-V generation (its model and its instance view).
    pub async fn instance_disk(
        &self,
        id: &ScaleSetId,
        instance: &str,
    ) -> Result<InstanceDisk, ComputeError> {
        let client = self.client.virtual_machine_scale_set_v_ms_client();
        let what = "read an instance's OS disk";
        let vm = self
            .read(|| async {
                client
                    .get(&id.resource_group, &id.name, instance, &id.subscription)
                    .await
                    .map_err(|e| self.classify(what, &id.subscription, e))
            })
            .await?;
        let os = vm
            .properties
            .as_ref()
            .and_then(|p| p.storage_profile.as_ref())
            .and_then(|s| s.os_disk.as_ref());
        let os_disk = os
            .and_then(|d| d.managed_disk.as_ref())
            .and_then(|m| m.sub_resource.id.clone())
            .ok_or_else(|| {
                ComputeError::Failed(format!("{what}: the instance has no managed OS disk"))
            })?;
        let os_type = os
            .and_then(|d| d.os_type.as_ref())
            .and_then(|t| serde_json::to_value(t).ok())
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "Linux".into());
        let view = self
            .read(|| async {
                client
                    .get_instance_view(&id.resource_group, &id.name, instance, &id.subscription)
                    .await
                    .map_err(|e| self.classify(what, &id.subscription, e))
            })
            .await?;
        let hyper_v_generation = view
            .hyper_v_generation
            .as_ref()
            .and_then(|g| serde_json::to_value(g).ok())
            .and_then(|v| v.as_str().map(str::to_string));
        let architecture = architecture_of(
            vm.sku
                .as_ref()
                .and_then(|s| s.name.as_deref())
                .unwrap_or_default(),
        )
        .to_string();
        Ok(InstanceDisk {
            os_disk,
            os_type,
            hyper_v_generation,
            architecture,
        })
    }

    /// Runs a script in an instance (Run Command): `RunShellScript` on Linux, `RunPowerShellScript`
    /// on Windows. Its output comes with the operation's end (`OperationStatus::output`).
    pub async fn run_command(
        &self,
        id: &ScaleSetId,
        instance: &str,
        script: &[String],
        windows: bool,
    ) -> Result<Accepted, ComputeError> {
        let command = if windows {
            "RunPowerShellScript"
        } else {
            "RunShellScript"
        };
        let mut input = models::RunCommandInput::new(command.to_string());
        input.script = script.to_vec();
        let response = self
            .client
            .virtual_machine_scale_set_v_ms_client()
            .run_command(
                &id.resource_group,
                &id.name,
                instance,
                input,
                &id.subscription,
            )
            .send()
            .await
            .map_err(|e| self.classify("run a command", &id.subscription, e))?;
        Ok(self.accepted(response.as_raw_response()))
    }

    /// Stops an instance and releases its host; its disks stay.
    pub async fn deallocate_instance(
        &self,
        id: &ScaleSetId,
        instance: &str,
    ) -> Result<Accepted, ComputeError> {
        let response = self
            .client
            .virtual_machine_scale_set_v_ms_client()
            .deallocate(&id.resource_group, &id.name, instance, &id.subscription)
            .send()
            .await
            .map_err(|e| self.classify("deallocate an instance", &id.subscription, e))?;
        Ok(self.accepted(response.as_raw_response()))
    }

    /// A snapshot copying a managed disk ("Create a snapshot by copying a disk").
    pub async fn create_snapshot(
        &self,
        id: &ScaleSetId,
        name: &str,
        location: &str,
        disk: &str,
    ) -> Result<Accepted, ComputeError> {
        let snapshot: models::Snapshot = model(
            "a snapshot",
            json!({"location": location, "properties": {"creationData": {"createOption": "Copy", "sourceResourceId": disk}}}),
        )?;
        let response = self
            .client
            .snapshots_client()
            .create_or_update(&id.subscription, &id.resource_group, name, snapshot)
            .send()
            .await
            .map_err(|e| self.classify("create a snapshot", &id.subscription, e))?;
        Ok(self.accepted(response.as_raw_response()))
    }

    pub async fn delete_snapshot(
        &self,
        id: &ScaleSetId,
        name: &str,
    ) -> Result<Accepted, ComputeError> {
        let response = self
            .client
            .snapshots_client()
            .delete(&id.subscription, &id.resource_group, name)
            .send()
            .await
            .map_err(|e| self.classify("delete a snapshot", &id.subscription, e))?;
        Ok(self.accepted(response.as_raw_response()))
    }

    /// Creates the gallery unless it exists (in the scale set's resource group).
    pub async fn ensure_gallery(
        &self,
        id: &ScaleSetId,
        gallery: &str,
        location: &str,
    ) -> Result<(), ComputeError> {
        let client = self.client.galleries_client();
        match client
            .get(&id.subscription, &id.resource_group, gallery)
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) => match self.classify("read a gallery", &id.subscription, e) {
                ComputeError::NotFound(_) => {}
                other => return Err(other),
            },
        }
        let body: models::Gallery = model(
            "a gallery",
            json!({"location": location, "properties": {"description": "Golden images captured by vmss-healer"}}),
        )?;
        client
            .create_or_update(&id.subscription, &id.resource_group, gallery, body)
            .send()
            .await
            .map_err(|e| self.classify("create a gallery", &id.subscription, e))?;
        Ok(())
    }

    /// Creates the image definition unless it exists: generalized, of the instance's OS type,
    /// Hyper-V generation and architecture. One that exists with another OS type or generation is
    /// refused: its versions could not boot this scale set's instances.
    #[allow(clippy::too_many_arguments)]
    pub async fn ensure_image_definition(
        &self,
        id: &ScaleSetId,
        gallery: &str,
        definition: &str,
        location: &str,
        os_type: &str,
        hyper_v_generation: &str,
        architecture: &str,
    ) -> Result<(), ComputeError> {
        let client = self.client.gallery_images_client();
        match client
            .get(&id.subscription, &id.resource_group, gallery, definition)
            .await
        {
            Ok(existing) => {
                let p = serde_json::to_value(&existing.properties).unwrap_or_default();
                let same = p["osType"].as_str() == Some(os_type)
                    && p["hyperVGeneration"]
                        .as_str()
                        .is_none_or(|g| g == hyper_v_generation);
                return if same {
                    Ok(())
                } else {
                    Err(ComputeError::Refused(ArmError {
                        status: 409,
                        code: "ImageDefinitionMismatch".into(),
                        message: format!(
                            "image definition {definition} is {} {}, the instance {os_type} {hyper_v_generation}",
                            p["osType"].as_str().unwrap_or("?"),
                            p["hyperVGeneration"].as_str().unwrap_or("?")
                        ),
                    }))
                };
            }
            Err(e) => match self.classify("read an image definition", &id.subscription, e) {
                ComputeError::NotFound(_) => {}
                other => return Err(other),
            },
        }
        let body: models::GalleryImage = model(
            "an image definition",
            json!({"location": location, "properties": {
                "osType": os_type, "osState": "Generalized", "hyperVGeneration": hyper_v_generation,
                "architecture": architecture,
                "identifier": {"publisher": "vmss-healer", "offer": id.name, "sku": definition}}}),
        )?;
        client
            .create_or_update(
                &id.subscription,
                &id.resource_group,
                gallery,
                definition,
                body,
            )
            .send()
            .await
            .map_err(|e| self.classify("create an image definition", &id.subscription, e))?;
        Ok(())
    }

    /// Starts an image version from a snapshot, replicated in the region with `storage`
    /// (`Standard_ZRS` where zones are offered, else `Standard_LRS`).
    #[allow(clippy::too_many_arguments)]
    pub async fn create_image_version(
        &self,
        id: &ScaleSetId,
        gallery: &str,
        definition: &str,
        version: &str,
        location: &str,
        source: &str,
        storage: &str,
    ) -> Result<Accepted, ComputeError> {
        let body: models::GalleryImageVersion = model(
            "an image version",
            json!({"location": location, "properties": {
                "storageProfile": {"source": {"id": source}},
                "publishingProfile": {"targetRegions": [{"name": location, "regionalReplicaCount": 1, "storageAccountType": storage}]}}}),
        )?;
        let response = self
            .client
            .gallery_image_versions_client()
            .create_or_update(
                &id.subscription,
                &id.resource_group,
                gallery,
                definition,
                version,
                body,
            )
            .send()
            .await
            .map_err(|e| self.classify("create an image version", &id.subscription, e))?;
        Ok(self.accepted(response.as_raw_response()))
    }

    /// The versions of an image definition (every page).
    pub async fn image_versions(
        &self,
        id: &ScaleSetId,
        gallery: &str,
        definition: &str,
    ) -> Result<Vec<ImageVersion>, ComputeError> {
        let mut pages = self
            .client
            .gallery_image_versions_client()
            .list_by_gallery_image(&id.subscription, &id.resource_group, gallery, definition)
            .into_stream();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page =
                page.map_err(|e| self.classify("list image versions", &id.subscription, e))?;
            for v in page.value {
                let props = serde_json::to_value(&v.properties).unwrap_or_default();
                out.push(ImageVersion {
                    name: v.resource.name.clone().unwrap_or_default(),
                    id: v.resource.id.clone().unwrap_or_default(),
                    provisioning_state: props["provisioningState"].as_str().map(str::to_string),
                });
            }
        }
        Ok(out)
    }

    pub async fn delete_image_version(
        &self,
        id: &ScaleSetId,
        gallery: &str,
        definition: &str,
        version: &str,
    ) -> Result<Accepted, ComputeError> {
        let response = self
            .client
            .gallery_image_versions_client()
            .delete(
                &id.subscription,
                &id.resource_group,
                gallery,
                definition,
                version,
            )
            .send()
            .await
            .map_err(|e| self.classify("delete an image version", &id.subscription, e))?;
        Ok(self.accepted(response.as_raw_response()))
    }

    /// Points the scale set's model at a custom image, with `If-Match` on a fresh read. A set on
    /// a platform image is refused here, before Azure would (it may not change its image type).
    pub async fn set_image(&self, id: &ScaleSetId, image: &str) -> Result<Accepted, ComputeError> {
        let info = self.scale_set(id).await?;
        if let Some(ImageRef::Platform(platform)) = &info.image {
            return Err(ComputeError::Refused(ArmError {
                status: 409,
                code: "OperationNotAllowed".into(),
                message: format!(
                    "the scale set runs the platform image {platform}: Azure does not let a scale set change its image type"
                ),
            }));
        }
        let Some(etag) = info.etag else {
            return Err(ComputeError::Failed(
                "the scale set reported no ETag; a model change without If-Match could override a concurrent one".into(),
            ));
        };
        let update: models::VirtualMachineScaleSetUpdate = model(
            "a model update",
            json!({"properties": {"virtualMachineProfile": {"storageProfile": {"imageReference": {"id": image}}}}}),
        )?;
        let response = self
            .client
            .virtual_machine_scale_sets_client()
            .update(&id.resource_group, &id.name, update, &id.subscription)
            .if_match(etag)
            .send()
            .await
            .map_err(|e| self.classify("point the model at an image", &id.subscription, e))?;
        Ok(self.accepted(response.as_raw_response()))
    }
}

#[cfg(test)]
mod tests {
    use super::architecture_of;

    #[test]
    fn arm64_sizes_are_told_by_their_p() {
        for (size, arch) in [
            ("Standard_D2ps_v5", "Arm64"),
            ("Standard_E4pds_v5", "Arm64"),
            ("Standard_D2s_v5", "x64"),
            ("Standard_B2s", "x64"),
            ("Standard_DC2s_v3", "x64"),
            ("Standard_M128-64ms", "x64"),
            ("", "x64"),
        ] {
            assert_eq!(architecture_of(size), arch, "{size}");
        }
    }
}
