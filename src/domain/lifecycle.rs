//! Resource Manager events about watched scale sets (design §2): they have the next mirror pass
//! read the scale set instead of waiting for its full resync. They are never taken as the truth
//! (anyone who reaches the endpoint can send one): the Compute API's answer is.

use crate::event::Event;
use crate::scaleset::{InstanceRef, ScaleSetId, VmRef};
use serde_json::Value;

pub const WRITE: &str = "Microsoft.Resources.ResourceWriteSuccess";
pub const DELETE: &str = "Microsoft.Resources.ResourceDeleteSuccess";
pub const ACTION: &str = "Microsoft.Resources.ResourceActionSuccess";
/// A write, delete or action that failed: it can leave its instances `Failed` (issue 19).
pub const FAILURES: [&str; 3] = [
    "Microsoft.Resources.ResourceWriteFailure",
    "Microsoft.Resources.ResourceDeleteFailure",
    "Microsoft.Resources.ResourceActionFailure",
];
/// Canceled ones: read as a change, no more.
pub const CANCELS: [&str; 3] = [
    "Microsoft.Resources.ResourceWriteCancel",
    "Microsoft.Resources.ResourceDeleteCancel",
    "Microsoft.Resources.ResourceActionCancel",
];

pub fn is_lifecycle(event_type: &str) -> bool {
    [WRITE, DELETE, ACTION]
        .iter()
        .chain(&FAILURES)
        .chain(&CANCELS)
        .any(|t| t.eq_ignore_ascii_case(event_type))
}

/// Actions that leave a VM stopped: `…/powerOff/action`, `…/deallocate/action`.
const STOPPING: [&str; 2] = ["/poweroff/action", "/deallocate/action"];

/// Whether the event says something that can make an instance unhealthy — an operation failed
/// (it may have left its instances `Failed`), or a VM was stopped — and so is worth an
/// evaluation of its scale set at once (issue 19), in words. Only a hint: anyone who reaches the
/// endpoint can send one, so the evaluation reads the scale set from the Compute API first and
/// judges what it says.
pub fn suspect(event: &Event) -> Option<String> {
    let operation = event
        .data
        .get("operationName")
        .and_then(Value::as_str)
        .unwrap_or("");
    if FAILURES
        .iter()
        .any(|t| t.eq_ignore_ascii_case(&event.event_type))
    {
        return Some(format!("{operation} failed"));
    }
    let lower = operation.to_ascii_lowercase();
    (event.event_type.eq_ignore_ascii_case(ACTION) && STOPPING.iter().any(|s| lower.ends_with(s)))
        .then(|| format!("{operation} succeeded"))
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

    fn rm_op(kind: &str, uri: &str, operation: &str) -> Event {
        decode(json!({"id": "1", "eventType": kind, "subject": uri, "eventTime": "2026-11-22T10:00:00Z",
            "data": {"resourceUri": uri, "operationName": operation}, "dataVersion": "2"}))
        .unwrap()
    }

    #[test]
    fn failures_and_stops_are_worth_an_evaluation_nothing_else_is() {
        let vm = format!("{SET}/virtualMachines/4");
        let flex = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/web_1a2b3c4d";
        let vmss_vm = "Microsoft.Compute/virtualMachineScaleSets/virtualMachines";
        for (kind, uri, operation, want) in [
            (
                "Microsoft.Resources.ResourceWriteFailure",
                SET,
                "Microsoft.Compute/virtualMachineScaleSets/write",
                true,
            ),
            (
                "Microsoft.Resources.ResourceActionFailure",
                SET,
                "Microsoft.Compute/virtualMachineScaleSets/reimage/action",
                true,
            ),
            (
                "microsoft.resources.resourcedeletefailure",
                vm.as_str(),
                "Microsoft.Compute/virtualMachineScaleSets/delete/action",
                true,
            ),
            (
                ACTION,
                vm.as_str(),
                &format!("{vmss_vm}/powerOff/action"),
                true,
            ),
            (
                ACTION,
                vm.as_str(),
                &format!("{vmss_vm}/deallocate/action"),
                true,
            ),
            (
                ACTION,
                flex,
                "Microsoft.Compute/virtualMachines/powerOff/action",
                true,
            ),
            (
                ACTION,
                flex,
                "Microsoft.Compute/virtualMachines/restart/action",
                false,
            ),
            (
                ACTION,
                SET,
                "Microsoft.Compute/virtualMachineScaleSets/start/action",
                false,
            ),
            (
                WRITE,
                SET,
                "Microsoft.Compute/virtualMachineScaleSets/write",
                false,
            ),
            (
                DELETE,
                vm.as_str(),
                "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/delete",
                false,
            ),
            (
                "Microsoft.Resources.ResourceActionCancel",
                SET,
                "Microsoft.Compute/virtualMachineScaleSets/reimage/action",
                false,
            ),
        ] {
            let event = rm_op(kind, uri, operation);
            assert!(is_lifecycle(&event.event_type), "{kind}");
            assert_eq!(suspect(&event).is_some(), want, "{kind} {operation}");
            assert!(read(&event).is_ok(), "{kind} {uri}");
        }
        // A failure is a change, never a deletion.
        let failed_delete = rm_op(
            FAILURES[1],
            &vm,
            "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/delete",
        );
        assert_eq!(
            read(&failed_delete),
            Ok(Change::ScaleSetChanged(ScaleSetId::parse(SET).unwrap()))
        );
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
