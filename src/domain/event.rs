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
    #[error("the event's `{field}` is not an ISO 8601 time Event Grid accepts: `{value}`")]
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

/// Reads a time as Event Grid accepts it: RFC 3339, and the other ISO 8601 forms agents send —
/// an offset without its colon (`+0000`, from `date +%Y-%m-%dT%H:%M:%S%z`, which the Prunella
/// agent uses), an offset in hours only (`+01`), a space instead of `T`, or no offset at all (read
/// as UTC, the clock of Azure's Linux images). Anything else is `None`.
pub fn parse_time(s: &str) -> Option<OffsetDateTime> {
    let s = s.trim();
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Some(t);
    }
    if s.len() > 64 || !s.is_ascii() {
        return None;
    }
    // The date is the first ten characters; what follows is the time and, maybe, its offset.
    let (date, rest) = s.split_at_checked(10)?;
    let time = rest.strip_prefix(['T', 't', ' '])?;
    let zoned = match time.rfind(['+', '-']) {
        Some(at) => {
            let (clock, offset) = time.split_at(at);
            let digits = &offset[1..];
            match digits.len() {
                4 if digits.bytes().all(|b| b.is_ascii_digit()) => {
                    format!("{clock}{}{}:{}", &offset[..1], &digits[..2], &digits[2..])
                }
                2 if digits.bytes().all(|b| b.is_ascii_digit()) => format!("{clock}{offset}:00"),
                _ => time.to_string(),
            }
        }
        None if time.ends_with(['Z', 'z']) => time.to_string(),
        None => format!("{time}Z"),
    };
    OffsetDateTime::parse(&format!("{date}T{zoned}"), &Rfc3339).ok()
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
    fn times_are_read_in_every_form_event_grid_accepts() {
        use time::macros::datetime;
        let utc = datetime!(2026-12-01 11:13:56 UTC);
        for (text, want) in [
            ("2026-12-01T11:13:56Z", Some(utc)),
            (
                "2026-12-01T11:13:56.0041Z",
                Some(datetime!(2026-12-01 11:13:56.0041 UTC)),
            ),
            ("2026-12-01T11:13:56+00:00", Some(utc)),
            // `date +%Y-%m-%dT%H:%M:%S%z`: the Prunella agent's form.
            ("2026-12-01T11:13:56+0000", Some(utc)),
            ("2026-12-01T12:13:56+0100", Some(utc)),
            ("2026-12-01T03:13:56-0800", Some(utc)),
            ("2026-12-01T12:13:56+01", Some(utc)),
            ("2026-12-01 11:13:56Z", Some(utc)),
            ("2026-12-01T11:13:56", Some(utc)),
            (" 2026-12-01T11:13:56+0000 ", Some(utc)),
            ("2026-13-01T11:13:56Z", None),
            ("2026-12-01T25:13:56Z", None),
            ("2026-12-01T11:13:56+2500", None),
            ("2026-12-01T11:13:56+000", None),
            ("2026-12-01", None),
            ("yesterday", None),
            ("2026-12-01T11:13:56+00:00:00", None),
            ("２０２６-12-01T11:13:56Z", None),
        ] {
            assert_eq!(parse_time(text), want, "{text:?}");
        }
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
