//! The calls a stateful replacement takes (issue 18), through the Compute SDK's own clients: a
//! VM's data disks attached and detached (`attachDetachDataDisks`: the scale-set VM API for a
//! Uniform instance, the VM API for a Flexible one; 202 with a `Location`), a disk made in a zone
//! from a snapshot, a disk deleted (the disk provider's 2024-03-02).

use super::image::model;
use super::{Accepted, Compute, ComputeError};
use crate::scaleset::{Orchestration, ScaleSetId};
use azure_mgmt_compute::package_2024_07_01::models;
use serde_json::json;

impl Compute {
    /// Attaches `(LUN, disk id)` each and detaches the disks named, on one instance.
    pub async fn attach_detach(
        &self,
        id: &ScaleSetId,
        instance: &str,
        mode: Orchestration,
        attach: &[(u32, String)],
        detach: &[String],
    ) -> Result<Accepted, ComputeError> {
        let request: models::AttachDetachDataDisksRequest = model(
            "an attach/detach request",
            json!({
                "dataDisksToAttach": attach.iter().map(|(lun, disk)| json!({"lun": lun, "diskId": disk, "caching": "ReadWrite"})).collect::<Vec<_>>(),
                "dataDisksToDetach": detach.iter().map(|disk| json!({"diskId": disk, "detachOption": "Default"})).collect::<Vec<_>>(),
            }),
        )?;
        let (rg, sub) = (&id.resource_group, &id.subscription);
        let what = "attach or detach data disks";
        let response = match mode {
            Orchestration::Uniform => self
                .client
                .virtual_machine_scale_set_v_ms_client()
                .attach_detach_data_disks(rg, &id.name, instance, request, sub)
                .send()
                .await
                .map(|r| r.into_raw_response()),
            Orchestration::Flexible => self
                .client
                .virtual_machines_client()
                .attach_detach_data_disks(rg, instance, request, sub)
                .send()
                .await
                .map(|r| r.into_raw_response()),
        }
        .map_err(|e| self.classify(what, sub, e))?;
        Ok(self.accepted(&response))
    }

    /// A managed disk in `zone` (none: regional) copied from a snapshot, in the scale set's
    /// resource group.
    pub async fn create_disk(
        &self,
        id: &ScaleSetId,
        name: &str,
        location: &str,
        zone: Option<&str>,
        snapshot: &str,
    ) -> Result<Accepted, ComputeError> {
        let mut body = json!({"location": location, "properties": {"creationData": {"createOption": "Copy", "sourceResourceId": snapshot}}});
        if let Some(z) = zone {
            body["zones"] = json!([z]);
        }
        let disk: models::Disk = model("a disk", body)?;
        let response = self
            .client
            .disks_client()
            .create_or_update(&id.subscription, &id.resource_group, name, disk)
            .send()
            .await
            .map_err(|e| self.classify("create a disk", &id.subscription, e))?;
        Ok(self.accepted(response.as_raw_response()))
    }

    /// Deletes a managed disk by its id (it must be in the scale set's subscription).
    pub async fn delete_disk(&self, id: &ScaleSetId, disk: &str) -> Result<Accepted, ComputeError> {
        let parts: Vec<&str> = disk.trim_matches('/').split('/').collect();
        let (Some(rg), Some(name)) = (parts.get(3), parts.get(7)) else {
            return Err(ComputeError::Failed(format!(
                "`{disk}` is not a disk's resource id"
            )));
        };
        if !parts
            .get(1)
            .is_some_and(|s| s.eq_ignore_ascii_case(&id.subscription))
        {
            return Err(ComputeError::Failed(format!(
                "disk `{disk}` is not in the scale set's subscription"
            )));
        }
        let response = self
            .client
            .disks_client()
            .delete(&id.subscription, *rg, *name)
            .send()
            .await
            .map_err(|e| self.classify("delete a disk", &id.subscription, e))?;
        Ok(self.accepted(response.as_raw_response()))
    }
}
