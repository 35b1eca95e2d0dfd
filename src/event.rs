//! Decoding one delivered event, in either schema the Event Grid trigger may hand over (design §1):
//! an Event Grid event or a CloudEvents 1.0 event, as a JSON object or as a JSON string holding
//! it (the Functions host string-encodes events, sometimes more than once).

use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The envelope fields every consumer needs, whatever the schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: String,
    pub event_type: String,
    pub subject: Option<String>,
    /// Event Grid `topic` or CloudEvents `source`.
    pub source: Option<String>,
    pub time: Option<OffsetDateTime>,
    pub data: Value,
    pub schema: Schema,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    EventGrid,
    CloudEvents,
}

/// Why a delivered payload is not an event at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadEnvelope {
    #[error("the event is a string that is not JSON: {0}")]
    NotJson(String),
    #[error("the event is string-encoded more than {0} times")]
    TooDeep(usize),
    #[error("the event is a JSON {0}, expected an object")]
    NotAnObject(&'static str),
    #[error("the event has neither `eventType` (Event Grid) nor `type` with `specversion` (CloudEvents)")]
    UnknownSchema,
    #[error("the event's `{field}` is missing or not a string")]
    MissingField { field: &'static str },
    #[error("the event's `{field}` is not an RFC 3339 time: `{value}`")]
    BadTime { field: &'static str, value: String },
}

const MAX_STRING_DEPTH: usize = 4;

/// Decodes a delivered event value.
pub fn decode(mut value: Value) -> Result<Event, BadEnvelope> {
    let mut depth = 0;
    while let Value::String(s) = value {
        if depth == MAX_STRING_DEPTH {
            return Err(BadEnvelope::TooDeep(MAX_STRING_DEPTH));
        }
        value = serde_json::from_str(&s).map_err(|e| BadEnvelope::NotJson(e.to_string()))?;
        depth += 1;
    }
    let Value::Object(mut obj) = value else {
        return Err(BadEnvelope::NotAnObject(json_kind(&value)));
    };
    let text = |obj: &serde_json::Map<String, Value>, key: &str| {
        obj.get(key).and_then(Value::as_str).map(str::to_string)
    };
    let (schema, type_key, time_key, source_key) = if obj.contains_key("specversion") {
        (Schema::CloudEvents, "type", "time", "source")
    } else if obj.contains_key("eventType") {
        (Schema::EventGrid, "eventType", "eventTime", "topic")
    } else {
        return Err(BadEnvelope::UnknownSchema);
    };
    let id = text(&obj, "id").ok_or(BadEnvelope::MissingField { field: "id" })?;
    let event_type = text(&obj, type_key).ok_or(BadEnvelope::MissingField {
        field: if schema == Schema::EventGrid {
            "eventType"
        } else {
            "type"
        },
    })?;
    let time = match obj.get(time_key) {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(parse_time(t).ok_or_else(|| BadEnvelope::BadTime {
            field: if schema == Schema::EventGrid {
                "eventTime"
            } else {
                "time"
            },
            value: t.clone(),
        })?),
        Some(other) => {
            return Err(BadEnvelope::BadTime {
                field: if schema == Schema::EventGrid {
                    "eventTime"
                } else {
                    "time"
                },
                value: other.to_string(),
            })
        }
    };
    Ok(Event {
        id,
        subject: text(&obj, "subject"),
        source: text(&obj, source_key),
        time,
        data: obj.remove("data").unwrap_or(Value::Null),
        event_type,
        schema,
    })
}

pub fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s.trim(), &Rfc3339).ok()
}

pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn grid() -> Value {
        json!({"id": "e1", "topic": "/t", "subject": "/s", "eventType": "VmssHealer.Heartbeat",
               "eventTime": "2026-11-22T10:52:00.0041Z", "data": {"status": "UP"},
               "dataVersion": "1", "metadataVersion": "1"})
    }

    #[test]
    fn event_grid_and_cloud_events_decode_to_one_shape() {
        let e = decode(grid()).unwrap();
        assert_eq!(e.schema, Schema::EventGrid);
        assert_eq!(e.event_type, "VmssHealer.Heartbeat");
        assert_eq!(e.source.as_deref(), Some("/t"));
        assert_eq!(e.data, json!({"status": "UP"}));
        let c = decode(
            json!({"specversion": "1.0", "id": "e2", "source": "/t", "subject": "/s",
            "type": "VmssHealer.Heartbeat", "time": "2026-11-22T10:52:00Z", "data": {}}),
        )
        .unwrap();
        assert_eq!(c.schema, Schema::CloudEvents);
        assert_eq!(c.time, parse_time("2026-11-22T10:52:00Z"));
    }

    #[test]
    fn string_encoded_events_are_unwrapped_up_to_a_limit() {
        let once = Value::String(grid().to_string());
        let twice = Value::String(once.to_string());
        assert_eq!(decode(once).unwrap(), decode(grid()).unwrap());
        assert_eq!(decode(twice).unwrap(), decode(grid()).unwrap());
        let mut deep = grid();
        for _ in 0..5 {
            deep = Value::String(deep.to_string());
        }
        assert_eq!(decode(deep), Err(BadEnvelope::TooDeep(4)));
    }

    #[test]
    fn malformed_envelopes_say_why() {
        assert!(matches!(
            decode(json!("{not json")),
            Err(BadEnvelope::NotJson(_))
        ));
        assert_eq!(decode(json!([1])), Err(BadEnvelope::NotAnObject("array")));
        assert_eq!(decode(json!({"id": "x"})), Err(BadEnvelope::UnknownSchema));
        assert_eq!(
            decode(json!({"eventType": "x"})),
            Err(BadEnvelope::MissingField { field: "id" })
        );
        let mut bad_time = grid();
        bad_time["eventTime"] = json!("yesterday");
        assert!(matches!(
            decode(bad_time),
            Err(BadEnvelope::BadTime {
                field: "eventTime",
                ..
            })
        ));
    }
}
