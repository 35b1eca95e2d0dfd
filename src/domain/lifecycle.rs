//! Resource Manager events about watched scale sets (design §2): they have the next mirror pass
//! read the scale set instead of waiting for its full resync. They are never taken as the truth
//! (anyone who reaches the endpoint can send one): the Compute API's answer is.

use crate::event::Event;
use crate::scaleset::{InstanceRef, ScaleSetId, VmRef};
use serde_json::Value;

pub const WRITE: &str = "Microsoft.Resources.ResourceWriteSuccess";
pub const DELETE: &str = "Microsoft.Resources.ResourceDeleteSuccess";
pub const ACTION: &str = "Microsoft.Resources.ResourceActionSuccess";

pub fn is_lifecycle(event_type: &str) -> bool {
    [WRITE, DELETE, ACTION]
        .iter()
        .any(|t| t.eq_ignore_ascii_case(event_type))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// One instance is said to be gone.
    InstanceDeleted(InstanceRef),
    /// The scale set is said to be gone.
    ScaleSetDeleted(ScaleSetId),
    /// The scale set or one of its instances changed: resync it on the next pass.
    ScaleSetChanged(ScaleSetId),
    /// A plain VM was written, acted on or deleted: a Flexible scale set's instance, perhaps.
    /// Its id does not name its set; every watched set that could hold it is resynced.
    VmChanged { vm: VmRef, deleted: bool },
}

impl Change {
    /// The scale set the change is about, when the event names it.
    pub fn scale_set(&self) -> Option<&ScaleSetId> {
        match self {
            Change::InstanceDeleted(i) => Some(&i.scale_set),
            Change::ScaleSetDeleted(s) | Change::ScaleSetChanged(s) => Some(s),
            Change::VmChanged { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAChange {
    #[error("Resource Manager event has no data.resourceUri")]
    MissingResourceUri,
    #[error("Resource Manager event is about `{0}`, not a scale set, its instances or a VM")]
    NotAScaleSet(String),
}

pub fn read(event: &Event) -> Result<Change, NotAChange> {
    let uri = event
        .data
        .get("resourceUri")
        .and_then(Value::as_str)
        .or(event.subject.as_deref())
        .ok_or(NotAChange::MissingResourceUri)?;
    let deleted = event.event_type.eq_ignore_ascii_case(DELETE);
    let Some((set, instance, rest)) = locate(uri) else {
        // A plain VM (`…/virtualMachines/<name>`, perhaps followed by an action or a
        // sub-resource): only deleting the VM itself is a deletion.
        let segments: Vec<&str> = uri.trim_end_matches('/').split('/').collect();
        let vm = (segments.len() >= 9)
            .then(|| VmRef::parse(&segments[..9].join("/")).ok())
            .flatten()
            .ok_or_else(|| NotAChange::NotAScaleSet(uri.to_string()))?;
        return Ok(Change::VmChanged {
            vm,
            deleted: deleted && segments.len() == 9,
        });
    };
    // Only the deletion of the resource itself removes it; deleting a sub-resource (an extension)
    // or an action (`…/restart`, `…/delete` of instances) changes it.
    Ok(match (deleted && rest == 0, instance) {
        (true, Some(id)) => Change::InstanceDeleted(set.instance(&id)),
        (true, None) => Change::ScaleSetDeleted(set),
        (false, _) => Change::ScaleSetChanged(set),
    })
}

/// The scale set a resource URI is about, the instance if it names one, and how many path segments
/// follow them: `…/virtualMachineScaleSets/web/virtualMachines/3/restart` → (web, 3, 1).
fn locate(uri: &str) -> Option<(ScaleSetId, Option<String>, usize)> {
    let segments: Vec<&str> = uri.trim_end_matches('/').split('/').collect();
    let at = segments
        .iter()
        .position(|s| s.eq_ignore_ascii_case("virtualMachineScaleSets"))?;
    let name_end = at + 2;
    if segments.len() < name_end {
        return None;
    }
    let set = ScaleSetId::parse(&segments[..name_end].join("/")).ok()?;
    let instance = segments
        .get(name_end)
        .filter(|s| s.eq_ignore_ascii_case("virtualMachines"))
        .and(segments.get(name_end + 1))
        .map(|id| id.to_string());
    let used = if instance.is_some() {
        name_end + 2
    } else {
        name_end
    };
    Some((set, instance, segments.len().saturating_sub(used)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::decode;
    use serde_json::json;

    const SET: &str =
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/web";

    fn rm(kind: &str, uri: &str) -> Event {
        decode(json!({"id": "1", "eventType": kind, "subject": uri, "eventTime": "2026-11-22T10:00:00Z",
            "data": {"resourceUri": uri, "operationName": "Microsoft.Compute/virtualMachineScaleSets/write"},
            "dataVersion": "2"}))
        .unwrap()
    }

    #[test]
    fn resource_manager_events_become_mirror_changes() {
        let set = ScaleSetId::parse(SET).unwrap();
        let vm = format!("{SET}/virtualMachines/4");
        assert_eq!(
            read(&rm(DELETE, &vm)),
            Ok(Change::InstanceDeleted(set.instance("4")))
        );
        assert_eq!(
            read(&rm(DELETE, SET)),
            Ok(Change::ScaleSetDeleted(set.clone()))
        );
        assert_eq!(
            read(&rm(WRITE, SET)),
            Ok(Change::ScaleSetChanged(set.clone()))
        );
        assert_eq!(
            read(&rm(WRITE, &vm)),
            Ok(Change::ScaleSetChanged(set.clone()))
        );
        assert_eq!(
            read(&rm(ACTION, &format!("{SET}/delete"))),
            Ok(Change::ScaleSetChanged(set.clone()))
        );
        // Actions on instances, and deleting a sub-resource, are changes, not deletions.
        assert_eq!(
            read(&rm(ACTION, &format!("{vm}/restart"))),
            Ok(Change::ScaleSetChanged(set.clone()))
        );
        assert_eq!(
            read(&rm(DELETE, &format!("{vm}/extensions/health"))),
            Ok(Change::ScaleSetChanged(set.clone()))
        );
        assert_eq!(
            read(&rm(DELETE, &format!("{SET}/extensions/health"))),
            Ok(Change::ScaleSetChanged(set.clone()))
        );
        assert!(matches!(
            read(&rm(
                WRITE,
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/a"
            )),
            Err(NotAChange::NotAScaleSet(_))
        ));
        assert!(is_lifecycle("microsoft.resources.resourcewritesuccess"));
        // A Flexible set's VMs are plain VMs: their events name the VM, not the set.
        let flex = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/web_1a2b3c4d";
        let vm = VmRef::parse(flex).unwrap();
        assert_eq!(
            read(&rm(DELETE, flex)),
            Ok(Change::VmChanged {
                vm: vm.clone(),
                deleted: true
            })
        );
        assert_eq!(
            read(&rm(ACTION, &format!("{flex}/restart"))),
            Ok(Change::VmChanged {
                vm: vm.clone(),
                deleted: false
            })
        );
        assert_eq!(
            read(&rm(DELETE, &format!("{flex}/extensions/health"))),
            Ok(Change::VmChanged { vm, deleted: false })
        );
    }
}
