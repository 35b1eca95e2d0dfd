//! The `instances` table: the mirror of each scale set's instances (design §3), and the
//! short-lived identity cache heartbeats are checked against.

use super::*;

impl Store {
    pub async fn mirror(
        &self,
        set: &ScaleSetId,
    ) -> Result<(Vec<MirroredInstance>, Skipped), StoreError> {
        let rows = self
            .instances
            .query(Some(format!("PartitionKey eq {}", quote(&set.key()))))
            .await?;
        Ok(collect(rows, instance_from_row))
    }

    /// The mirrored instance for a heartbeat's identity check, from a short-lived cache.
    pub async fn mirrored_identity(
        &self,
        set: &ScaleSetId,
        instance_id: &str,
    ) -> Result<Option<Instance>, StoreError> {
        let key = (set.key(), instance_id.to_string());
        if let Some((inst, at)) = lock(&self.identities).get(&key) {
            if at.elapsed() < IDENTITY_TTL {
                return Ok(Some(inst.clone()));
            }
        }
        let found = self.mirrored_instance(set, instance_id).await?;
        if let Some(inst) = &found {
            let mut cache = lock(&self.identities);
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(key, (inst.clone(), Instant::now()));
        }
        Ok(found)
    }

    pub async fn mirrored_instance(
        &self,
        set: &ScaleSetId,
        instance_id: &str,
    ) -> Result<Option<Instance>, StoreError> {
        match self.instances.get(&set.key(), instance_id).await? {
            Some(row) => Ok(instance_from_row(&row).ok().map(|m| m.instance)),
            None => Ok(None),
        }
    }

    /// Writes new and changed instances, and refreshes the sync time of unchanged ones.
    pub async fn write_mirror(
        &self,
        set: &ScaleSetId,
        instances: &[Instance],
        synced_at: OffsetDateTime,
    ) -> Result<usize, StoreError> {
        let entities = instances
            .iter()
            .map(|i| instance_entity(set, i, synced_at))
            .collect();
        self.instances.upsert_batch(&set.key(), entities).await
    }

    pub async fn remove_instances(
        &self,
        set: &ScaleSetId,
        instance_ids: &[String],
    ) -> Result<usize, StoreError> {
        let removed = self
            .instances
            .delete_batch(&set.key(), instance_ids)
            .await?;
        // A heartbeat of a VM that no longer exists would only confuse a reader.
        self.heartbeats
            .delete_batch(&set.key(), instance_ids)
            .await?;
        Ok(removed)
    }
}

fn instance_entity(set: &ScaleSetId, i: &Instance, synced_at: OffsetDateTime) -> Entity {
    Entity::new(&set.key(), &i.instance_id)
        .opt_str("vmId", i.vm_id.clone())
        .opt_str("computerName", i.computer_name.clone())
        .opt_str("provisioningState", i.provisioning_state.clone())
        .opt_str("powerState", i.power_state.clone())
        .opt_str("healthState", i.health.map(|h| h.as_str()))
        .opt_time("healthSince", i.health_since)
        .opt_bool("latestModelApplied", i.latest_model_applied)
        .bool(
            "protectFromScaleSetActions",
            i.protected_from_scale_set_actions,
        )
        .bool("protectFromScaleIn", i.protected_from_scale_in)
        .bool("deleteLocked", i.delete_locked)
        .opt_str("zone", i.zone.clone())
        .opt_time("createdAt", i.created_at)
        .opt_time("provisionedAt", i.provisioned_at)
        .opt_str(
            "dataDisks",
            (!i.data_disks.is_empty()).then(|| {
                i.data_disks
                    .iter()
                    .map(|(lun, id)| format!("{lun}={id}"))
                    .collect::<Vec<_>>()
                    .join(";")
            }),
        )
        .time("syncedAt", synced_at)
}

fn instance_from_row(r: &Row) -> Result<MirroredInstance, RowError> {
    Ok(MirroredInstance {
        instance: Instance {
            instance_id: r.row_key().to_string(),
            vm_id: r.opt_str("vmId"),
            computer_name: r.opt_str("computerName"),
            provisioning_state: r.opt_str("provisioningState"),
            power_state: r.opt_str("powerState"),
            health: r
                .opt_str("healthState")
                .and_then(|h| AppHealth::from_code(&h)),
            health_since: r.opt_time("healthSince")?,
            latest_model_applied: r.opt_bool("latestModelApplied"),
            protected_from_scale_set_actions: r
                .opt_bool("protectFromScaleSetActions")
                .unwrap_or(false),
            protected_from_scale_in: r.opt_bool("protectFromScaleIn").unwrap_or(false),
            // Rows written before locks were read have none.
            delete_locked: r.opt_bool("deleteLocked").unwrap_or(false),
            zone: r.opt_str("zone"),
            created_at: r.opt_time("createdAt")?,
            provisioned_at: r.opt_time("provisionedAt")?,
            // `<lun>=<disk id>;…`: a disk id holds neither `=` nor `;`.
            data_disks: r
                .opt_str("dataDisks")
                .map(|raw| {
                    raw.split(';')
                        .filter_map(|pair| {
                            let (lun, id) = pair.split_once('=')?;
                            Some((lun.parse().ok()?, id.to_string()))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        },
        synced_at: r.time("syncedAt")?,
    })
}
