//! Resource Manager events about watched scale sets (design §2): they update the mirror as they
//! arrive instead of a minute later.

use crate::event::Event;
use crate::scaleset::{InstanceRef, ScaleSetId};
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
    /// One instance is gone: drop it from the mirror now.
    InstanceDeleted(InstanceRef),
    /// The scale set is gone.
    ScaleSetDeleted(ScaleSetId),
    /// The scale set or one of its instances changed: resync it on the next pass.
    ScaleSetChanged(ScaleSetId),
}

impl Change {
    pub fn scale_set(&self) -> &ScaleSetId {
        match self {
            Change::InstanceDeleted(i) => &i.scale_set,
            Change::ScaleSetDeleted(s) | Change::ScaleSetChanged(s) => s,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAChange {
    #[error("Resource Manager event has no data.resourceUri")]
    MissingResourceUri,
    #[error("Resource Manager event is about `{0}`, not a scale set or its instances")]
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
    if let Ok(instance) = InstanceRef::parse(uri) {
        return Ok(if deleted {
            Change::InstanceDeleted(instance)
        } else {
            Change::ScaleSetChanged(instance.scale_set)
        });
    }
    // Actions name a sub-path (`…/virtualMachineScaleSets/web/delete`, `…/restart`).
    let set = ScaleSetId::parse(uri).or_else(|_| {
        let trimmed = uri.trim_end_matches('/');
        let parent = trimmed.rsplit_once('/').map(|(p, _)| p).unwrap_or(trimmed);
        ScaleSetId::parse(parent)
    });
    match set {
        Ok(set) if deleted && ScaleSetId::parse(uri).is_ok() => Ok(Change::ScaleSetDeleted(set)),
        Ok(set) => Ok(Change::ScaleSetChanged(set)),
        Err(_) => Err(NotAChange::NotAScaleSet(uri.to_string())),
    }
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
            Ok(Change::ScaleSetChanged(set))
        );
        assert!(matches!(
            read(&rm(
                WRITE,
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/a"
            )),
            Err(NotAChange::NotAScaleSet(_))
        ));
        assert!(is_lifecycle("microsoft.resources.resourcewritesuccess"));
    }
}
