//! Autoscale settings (`Microsoft.Insights/autoscalesettings`, api-version 2022-10-01) and how a
//! blue/green swap moves one from the old scale set to the new: a setting's target cannot change
//! ("The target resource reference is immutable. If you want to change it, please create a new
//! autoscale setting with a different name", 400 `TargetResourceIdIsImmutable`), so the new set's
//! own setting takes the old one's profiles — created when it has none — and the old set's is
//! disabled, which keeps it at zero. Pure: the Compute edge reads and writes them.

use crate::scaleset::ScaleSetId;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An autoscale setting as ARM returned it: the fields a swap decides on, and the whole
/// resource, written back as read but for what the swap changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoscaleSetting {
    pub name: String,
    pub subscription: String,
    pub resource_group: String,
    /// The scale set it scales (`properties.targetResourceUri`).
    pub target: String,
    pub enabled: bool,
    /// The first profile's minimum and maximum instance count.
    pub range: Option<(u32, u32)>,
    pub resource: Value,
}

impl AutoscaleSetting {
    /// One setting of ARM's list; `None` for what is not one.
    pub fn from_arm(resource: Value) -> Option<Self> {
        let id = resource["id"].as_str()?;
        let parts: Vec<&str> = id.split('/').collect();
        let after = |name: &str| {
            parts
                .iter()
                .position(|p| p.eq_ignore_ascii_case(name))
                .and_then(|i| parts.get(i + 1))
                .map(|s| s.to_string())
        };
        let p = &resource["properties"];
        let capacity = &p["profiles"][0]["capacity"];
        let count = |k: &str| capacity[k].as_str().and_then(|v| v.parse::<u32>().ok());
        Some(AutoscaleSetting {
            name: resource["name"]
                .as_str()
                .map(str::to_string)
                .or_else(|| after("autoscalesettings"))?,
            subscription: after("subscriptions")?,
            resource_group: after("resourceGroups")?,
            target: p["targetResourceUri"].as_str()?.to_string(),
            enabled: p["enabled"].as_bool().unwrap_or(true),
            range: count("minimum").zip(count("maximum")),
            resource,
        })
    }

    pub fn targets(&self, id: &ScaleSetId) -> bool {
        self.target.eq_ignore_ascii_case(&id.resource_id())
    }

    /// What a PUT of it sends: the resource without what ARM sets itself.
    pub fn body(&self) -> Value {
        let mut body = self.resource.clone();
        if let Some(o) = body.as_object_mut() {
            for k in ["id", "name", "type", "etag", "systemData"] {
                o.remove(k);
            }
        }
        body
    }

    /// In words, for the journal.
    pub fn describe(&self) -> String {
        format!(
            "{} ({}{})",
            self.name,
            if self.enabled { "enabled" } else { "disabled" },
            self.range
                .map(|(min, max)| format!(", {min}–{max} instances"))
                .unwrap_or_default()
        )
    }
}

/// One write of a move, and how it is undone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Write {
    pub subscription: String,
    pub resource_group: String,
    pub name: String,
    pub body: Value,
    /// What was there before: written back on a rollback; `None`: the write created it, and a
    /// rollback deletes it.
    pub before: Option<Value>,
}

/// The settings targeting a scale set, of those read.
pub fn targeting<'a>(
    settings: &'a [AutoscaleSetting],
    id: &ScaleSetId,
) -> Vec<&'a AutoscaleSetting> {
    settings.iter().filter(|s| s.targets(id)).collect()
}

/// The writes that move `from`'s setting to `to`, in the order they must land: first `to`'s
/// setting takes `from`'s profiles, notifications and enabled flag (its rules measuring `to`,
/// not `from`), then `from`'s is disabled, so `from` may stay at zero. `existing` are the
/// settings of `to`'s resource group: a new setting gets a name none of them has.
pub fn move_writes(
    from_setting: &AutoscaleSetting,
    to_setting: Option<&AutoscaleSetting>,
    from: &ScaleSetId,
    to: &ScaleSetId,
    existing: &[AutoscaleSetting],
) -> Vec<Write> {
    let retarget = |v: &Value| -> Value {
        let text = v.to_string();
        // Rules name the scale set they measure (`metricTrigger.metricResourceUri`).
        let replaced = replace_ignore_case(&text, &from.resource_id(), &to.resource_id());
        serde_json::from_str(&replaced).unwrap_or_else(|_| v.clone())
    };
    let source = &from_setting.resource["properties"];
    let mut to_write = match to_setting {
        Some(s) => s.body(),
        None => {
            let mut body = from_setting.body();
            if let Some(tags) = body.get_mut("tags") {
                *tags = Value::Object(Default::default());
            }
            body
        }
    };
    let name = match to_setting {
        Some(s) => s.name.clone(),
        None => free_name(
            &format!("{}-autoscale", to.name),
            existing,
            &to.resource_group,
        ),
    };
    to_write["properties"]["profiles"] = retarget(&source["profiles"]);
    to_write["properties"]["notifications"] = source
        .get("notifications")
        .cloned()
        .unwrap_or(Value::Array(Vec::new()));
    to_write["properties"]["enabled"] = Value::Bool(from_setting.enabled);
    to_write["properties"]["targetResourceUri"] = Value::String(to.resource_id());
    to_write["properties"]["name"] = Value::String(name.clone());
    let mut off = from_setting.body();
    off["properties"]["enabled"] = Value::Bool(false);
    vec![
        Write {
            subscription: to.subscription.clone(),
            resource_group: to.resource_group.clone(),
            name,
            body: to_write,
            before: to_setting.map(AutoscaleSetting::body),
        },
        Write {
            subscription: from_setting.subscription.clone(),
            resource_group: from_setting.resource_group.clone(),
            name: from_setting.name.clone(),
            body: off,
            before: Some(from_setting.body()),
        },
    ]
}

fn free_name(base: &str, existing: &[AutoscaleSetting], resource_group: &str) -> String {
    let taken = |n: &str| {
        existing.iter().any(|s| {
            s.name.eq_ignore_ascii_case(n) && s.resource_group.eq_ignore_ascii_case(resource_group)
        })
    };
    let mut name = base.to_string();
    let mut i = 2;
    while taken(&name) {
        name = format!("{base}-{i}");
        i += 1;
    }
    name
}

fn replace_ignore_case(text: &str, from: &str, to: &str) -> String {
    let (lower, needle) = (text.to_ascii_lowercase(), from.to_ascii_lowercase());
    let mut out = String::with_capacity(text.len());
    let mut rest = 0;
    while let Some(i) = lower[rest..].find(&needle) {
        out.push_str(&text[rest..rest + i]);
        out.push_str(to);
        rest += i + needle.len();
    }
    out.push_str(&text[rest..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(name: &str) -> ScaleSetId {
        ScaleSetId::new("sub", "rg", name)
    }

    fn setting(
        name: &str,
        target: &ScaleSetId,
        enabled: bool,
        min: &str,
        max: &str,
    ) -> AutoscaleSetting {
        AutoscaleSetting::from_arm(json!({
            "id": format!("/subscriptions/sub/resourceGroups/rg/providers/microsoft.insights/autoscalesettings/{name}"),
            "name": name,
            "type": "Microsoft.Insights/autoscaleSettings",
            "location": "westeurope",
            "tags": {"team": "web"},
            "properties": {
                "name": name,
                "enabled": enabled,
                "targetResourceUri": target.resource_id(),
                "profiles": [{"name": "default", "capacity": {"minimum": min, "maximum": max, "default": min},
                    "rules": [{"metricTrigger": {"metricName": "Percentage CPU",
                        "metricResourceUri": target.resource_id().to_ascii_lowercase()}}]}],
                "notifications": [{"operation": "Scale", "email": {"customEmails": ["ops@example.com"]}}]
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_setting_is_read_from_what_arm_lists() {
        let s = setting("as-blue", &set("blue"), true, "2", "10");
        assert_eq!(
            (s.subscription.as_str(), s.resource_group.as_str()),
            ("sub", "rg")
        );
        assert_eq!(s.range, Some((2, 10)));
        assert!(s.targets(&set("blue")) && !s.targets(&set("green")));
        assert!(s.body().get("id").is_none() && s.body().get("location").is_some());
        assert_eq!(s.describe(), "as-blue (enabled, 2–10 instances)");
        assert!(AutoscaleSetting::from_arm(json!({"name": "x"})).is_none());
    }

    #[test]
    fn a_move_creates_the_new_sets_setting_then_disables_the_old_one() {
        let (blue, green) = (set("blue"), set("green"));
        let a = setting("as-blue", &blue, true, "2", "10");
        // A setting of that name for another set exists: the new one takes the next free name.
        let taken = setting("green-autoscale", &set("other"), false, "0", "1");
        let writes = move_writes(&a, None, &blue, &green, &[a.clone(), taken]);
        assert_eq!(writes.len(), 2);
        let (new, off) = (&writes[0], &writes[1]);
        assert_eq!(new.name, "green-autoscale-2");
        assert_eq!(new.before, None, "created: a rollback deletes it");
        let p = &new.body["properties"];
        assert_eq!(p["targetResourceUri"], json!(green.resource_id()));
        assert_eq!(p["enabled"], json!(true));
        assert_eq!(p["profiles"][0]["capacity"]["minimum"], "2");
        assert_eq!(
            p["profiles"][0]["rules"][0]["metricTrigger"]["metricResourceUri"],
            json!(green.resource_id()),
            "its rules measure the new set"
        );
        assert_eq!(
            p["notifications"],
            a.resource["properties"]["notifications"]
        );
        assert_eq!(
            new.body["tags"],
            json!({}),
            "the old set's tags are not the new one's"
        );
        assert_eq!(
            (off.name.as_str(), off.body["properties"]["enabled"].clone()),
            ("as-blue", json!(false))
        );
        assert_eq!(
            off.body["properties"]["targetResourceUri"],
            json!(blue.resource_id()),
            "a target never changes"
        );
        assert_eq!(off.before, Some(a.body()));
    }

    #[test]
    fn a_move_onto_the_new_sets_own_setting_keeps_its_name_and_remembers_it() {
        let (blue, green) = (set("blue"), set("green"));
        let a = setting("as-blue", &blue, true, "2", "10");
        let b = setting("as-green", &green, false, "0", "0");
        let writes = move_writes(&a, Some(&b), &blue, &green, &[a.clone(), b.clone()]);
        assert_eq!(writes[0].name, "as-green");
        assert_eq!(writes[0].before, Some(b.body()));
        assert_eq!(writes[0].body["tags"], json!({"team": "web"}));
        assert_eq!(
            writes[0].body["properties"]["profiles"][0]["capacity"]["maximum"],
            "10"
        );
        assert_eq!(writes[0].body["properties"]["enabled"], json!(true));
    }
}
