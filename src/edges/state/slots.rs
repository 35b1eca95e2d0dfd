//! The `slots` table (design §3): a stateful set's slots, PartitionKey the scale set's key,
//! RowKey the slot id; what follows an instance across replacements (its data disks, its
//! address). Created by `monitor-state` when a set is first mirrored, moved to the new instance
//! by a stateful replacement; every change conditional on the row's ETag.

use super::*;
use crate::slot::{Slot, SlotDisk};

impl Store {
    /// Every slot of the scale set, with its version.
    pub async fn slots(
        &self,
        set: &ScaleSetId,
    ) -> Result<(Vec<Versioned<Slot>>, Skipped), StoreError> {
        let rows = self
            .slots
            .query(Some(format!("PartitionKey eq {}", quote(&set.key()))))
            .await?;
        let (mut slots, skipped) = collect(rows, |r| {
            Ok(Versioned {
                value: slot_from_row(r)?,
                version: r.etag().unwrap_or_default().to_string(),
            })
        });
        slots.sort_by(|a, b| a.value.id.cmp(&b.value.id));
        Ok((slots, skipped))
    }

    /// Creates a slot; [`StoreError::Conflict`] if another writer created it first.
    pub async fn insert_slot(&self, set: &ScaleSetId, slot: &Slot) -> Result<String, StoreError> {
        self.slots.insert(slot_entity(set, slot)).await
    }

    /// Writes a slot over the version read; `None` if another writer changed it first.
    pub async fn update_slot(
        &self,
        set: &ScaleSetId,
        slot: &Slot,
        version: &str,
    ) -> Result<Option<String>, StoreError> {
        match self
            .slots
            .replace_if(&set.key(), slot_entity(set, slot), version)
            .await
        {
            Ok(v) => Ok(Some(v)),
            Err(StoreError::PreconditionFailed { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn slot_entity(set: &ScaleSetId, slot: &Slot) -> Entity {
    Entity::new(&set.key(), &slot.id)
        .str("instance", slot.instance.clone())
        .str(
            "disks",
            serde_json::to_string(&slot.disks).unwrap_or_else(|_| "[]".into()),
        )
        .opt_str("address", slot.address.clone())
        .opt_str("zone", slot.zone.clone())
        .time("updated", slot.updated)
}

fn slot_from_row(r: &Row) -> Result<Slot, RowError> {
    let disks: Vec<SlotDisk> = serde_json::from_str(&r.str("disks")?).map_err(|e| RowError {
        row_key: r.row_key().to_string(),
        property: "disks".into(),
        why: format!("is not a list of disks: {e}"),
    })?;
    Ok(Slot {
        id: r.row_key().to_string(),
        instance: r.str("instance")?,
        disks,
        address: r.opt_str("address"),
        zone: r.opt_str("zone"),
        updated: r.time("updated")?,
    })
}
