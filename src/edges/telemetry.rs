//! Traces, logs and metrics in Application Insights, when `APPLICATIONINSIGHTS_CONNECTION_STRING`
//! is set (the Function App has it).
//!
//! The host already records every line the handler prints, but as text: the fields of a decision
//! (scale set, instance, incident) are lost, and nothing can be charted or alerted on. So the
//! handler also exports, through OpenTelemetry and its Application Insights exporter:
//! - every log event, with its severity and fields (`traces`, `customDimensions`);
//! - one span per invocation (`requests`) and per Compute call (`dependencies`);
//! - the metrics of [`METRICS`] (`customMetrics`), which the alert rules and the workbook of
//!   `infra/monitoring.bicep` read by name.
//!
//! Everything that leaves goes through [`Uplink`], our HTTP client for the exporter: it redacts
//! every upload as the log writer redacts every line, and authenticates with the app's managed
//! identity when the resource refuses instrumentation keys (`DisableLocalAuth`, as `infra/`
//! deploys it; the host is told the same by `APPLICATIONINSIGHTS_AUTHENTICATION_STRING`).
//!
//! Metrics are recorded from what the passes report and journal, at the edges (function modules,
//! the journal writer, the Compute transport); without a connection string the instruments are
//! OpenTelemetry's no-ops.

use crate::journal::{Entry, EntryKind};
use azure_core::auth::TokenCredential;
use opentelemetry::metrics::{Counter, Gauge, Histogram};
use opentelemetry::KeyValue;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use std::io::{Read, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use url::Url;

pub const CONNECTION_STRING: &str = "APPLICATIONINSIGHTS_CONNECTION_STRING";
pub const AUTHENTICATION_STRING: &str = "APPLICATIONINSIGHTS_AUTHENTICATION_STRING";

/// The token audience of Application Insights ingestion with Microsoft Entra ID, as Microsoft's
/// own exporters ask for it (azure-monitor-opentelemetry-exporter, `HttpPipelineBuilder`).
const INGESTION_SCOPE: &str = "https://monitor.azure.com//.default";
/// Where a connection string without an endpoint sends telemetry (Microsoft's parsers' default).
const DEFAULT_INGESTION: &str = "https://dc.services.visualstudio.com";
/// One upload's longest wait; the exporter retries 408/429/5xx itself, within 35 s.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Failed uploads are reported at most this often, on standard error only: a report through
/// `tracing` would itself be exported, and feed the failure it reports.
const COMPLAINT_INTERVAL: Duration = Duration::from_secs(60);

pub const UNHEALTHY: &str = "healer.instances.unhealthy";
pub const INSTANCES: &str = "healer.instances";
pub const REPAIRS: &str = "healer.repairs";
pub const BRAKE_HELD: &str = "healer.brake.held_seconds";
pub const PASS_DURATION: &str = "healer.pass.duration";
pub const MIRROR_PASSES: &str = "healer.mirror.passes";
pub const COMPUTE_CALLS: &str = "healer.compute.calls";
pub const THROTTLES: &str = "healer.compute.throttles";

/// Every metric the handler exports; the alert rules and the workbook may name only these
/// (`tests/infra.rs`).
pub const METRICS: [&str; 8] = [
    UNHEALTHY,
    INSTANCES,
    REPAIRS,
    BRAKE_HELD,
    PASS_DURATION,
    MIRROR_PASSES,
    COMPUTE_CALLS,
    THROTTLES,
];

/// The dimensions (`customDimensions`) each metric is recorded with; queries may group and filter
/// by these only (`tests/infra.rs`, `tests/telemetry.rs`).
pub const DIMENSIONS: [(&str, &[&str]); 8] = [
    (UNHEALTHY, &["scale_set"]),
    (INSTANCES, &["scale_set"]),
    (
        REPAIRS,
        &["scale_set", "action", "kind", "outcome", "dry_run"],
    ),
    (BRAKE_HELD, &["scale_set", "brake"]),
    (PASS_DURATION, &["function", "result"]),
    (MIRROR_PASSES, &["scale_set", "outcome"]),
    (COMPUTE_CALLS, &["operation", "status"]),
    (THROTTLES, &["subscription"]),
];

/// Where telemetry goes and how the upload proves who sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The ingestion endpoint's track URL (`…/v2.1/track`).
    pub track: Url,
    pub instrumentation_key: String,
    /// Upload with a Microsoft Entra token of the app's identity instead of the key alone.
    pub entra: bool,
}

impl Target {
    /// Reads a connection string (`InstrumentationKey=…;IngestionEndpoint=…`, keys in any case,
    /// as the Azure portal shows it) and the host's authentication string (`Authorization=AAD`).
    pub fn parse(connection: &str, authentication: Option<&str>) -> Result<Target, String> {
        let fields = pairs(connection, CONNECTION_STRING)?;
        let field = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let instrumentation_key = field("InstrumentationKey")
            .ok_or_else(|| format!("{CONNECTION_STRING} has no InstrumentationKey"))?;
        if let Some(auth) = field("Authorization") {
            if !auth.eq_ignore_ascii_case("ikey") {
                return Err(format!(
                    "{CONNECTION_STRING}: Authorization={auth} is not understood; Microsoft Entra authentication is set with {AUTHENTICATION_STRING}=Authorization=AAD"
                ));
            }
        }
        let endpoint = match (field("IngestionEndpoint"), field("EndpointSuffix")) {
            (Some(endpoint), _) => endpoint,
            (None, Some(suffix)) => match field("Location") {
                Some(location) => format!("https://{location}.dc.{suffix}"),
                None => format!("https://dc.{suffix}"),
            },
            (None, None) => DEFAULT_INGESTION.to_string(),
        };
        let base = Url::parse(&endpoint).map_err(|e| {
            format!("{CONNECTION_STRING}: IngestionEndpoint `{endpoint}` is not a URL ({e})")
        })?;
        // Telemetry carries the fleet's names and states: plain HTTP only to this machine, for a
        // local collector.
        let loopback = matches!(base.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
        if base.scheme() != "https" && !(base.scheme() == "http" && loopback) {
            return Err(format!(
                "{CONNECTION_STRING}: IngestionEndpoint `{endpoint}` must be https (http only on this machine)"
            ));
        }
        // Microsoft's exporters post to v2.1, which takes both keys and Entra tokens
        // (azure-monitor-opentelemetry-exporter, `getFullIngestionUrl`).
        let track = base
            .join(&format!("{}/v2.1/track", base.path().trim_end_matches('/')))
            .map_err(|e| format!("{CONNECTION_STRING}: IngestionEndpoint `{endpoint}`: {e}"))?;
        let entra = match authentication.map(str::trim).filter(|a| !a.is_empty()) {
            None => false,
            Some(raw) => {
                let auth = pairs(raw, AUTHENTICATION_STRING)?;
                let get = |name: &str| {
                    auth.iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(name))
                        .map(|(_, v)| v.trim())
                };
                match get("Authorization") {
                    Some(a) if a.eq_ignore_ascii_case("AAD") => {}
                    _ => {
                        return Err(format!(
                            "{AUTHENTICATION_STRING} must be `Authorization=AAD`, got `{raw}`"
                        ))
                    }
                }
                if let Some(client_id) = get("ClientId").filter(|c| !c.is_empty()) {
                    // The same limit as every other use of the identity (`identity::credential`).
                    return Err(format!(
                        "{AUTHENTICATION_STRING} names a user-assigned identity ({client_id}); this build uploads only with the Function App's system-assigned identity"
                    ));
                }
                true
            }
        };
        Ok(Target {
            track,
            instrumentation_key,
            entra,
        })
    }

    /// The connection string the exporter is built from: only its key matters, as every upload
    /// goes to [`Target::track`] through the [`Uplink`].
    fn for_exporter(&self) -> String {
        format!("InstrumentationKey={}", self.instrumentation_key)
    }
}

/// `k=v;k=v`, tolerating empty segments (a trailing `;`).
fn pairs(raw: &str, name: &str) -> Result<Vec<(String, String)>, String> {
    raw.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
            _ => Err(format!(
                "{name}: `{}` is not `key=value`",
                crate::secret::redact(kv)
            )),
        })
        .collect()
}

/// The exporter's HTTP client: every upload to the configured endpoint, redacted, with a token
/// when Entra authentication is on. The SDK exports from its own threads; the request runs on the
/// handler's runtime.
#[derive(Clone)]
pub struct Uplink {
    inner: Arc<UplinkInner>,
}

struct UplinkInner {
    http: reqwest::Client,
    track: Url,
    runtime: tokio::runtime::Handle,
    credential: Option<Arc<dyn TokenCredential>>,
    complaints: Mutex<Complaints>,
}

#[derive(Default)]
struct Complaints {
    last: Option<Instant>,
    unsaid: u64,
}

impl std::fmt::Debug for Uplink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uplink")
            .field("track", &self.inner.track.as_str())
            .field("entra", &self.inner.credential.is_some())
            .finish()
    }
}

impl Uplink {
    pub fn new(
        target: &Target,
        runtime: tokio::runtime::Handle,
        credential: Option<Arc<dyn TokenCredential>>,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(UPLOAD_TIMEOUT)
            .build()
            .map_err(|e| anyhow::anyhow!("building the telemetry HTTP client: {e}"))?;
        Ok(Uplink {
            inner: Arc::new(UplinkInner {
                http,
                track: target.track.clone(),
                runtime,
                credential,
                complaints: Mutex::new(Complaints::default()),
            }),
        })
    }

    /// A failed upload, said on standard error (the host logs it as a warning) at most once a
    /// minute.
    fn complain(&self, what: &str) {
        let mut c = self
            .inner
            .complaints
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if c.last.is_some_and(|t| t.elapsed() < COMPLAINT_INTERVAL) {
            c.unsaid += 1;
            return;
        }
        let unsaid = std::mem::take(&mut c.unsaid);
        c.last = Some(Instant::now());
        let line = format!(
            "WARN telemetry upload to Application Insights failed: {what}{}\n",
            if unsaid > 0 {
                format!(" ({unsaid} more failures since the last report)")
            } else {
                String::new()
            }
        );
        let _ = std::io::stderr().write_all(crate::secret::redact(&line).as_bytes());
    }
}

/// An upload's body with every secret masked; gzip in, gzip out.
pub fn redact_upload(body: &[u8], gzip: bool) -> std::io::Result<Vec<u8>> {
    let mut text = String::new();
    if gzip {
        flate2::read::GzDecoder::new(body).read_to_string(&mut text)?;
    } else {
        text = String::from_utf8(body.to_vec())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    }
    let text = crate::secret::redact(&text);
    if !gzip {
        return Ok(text.into_bytes());
    }
    let mut out = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    out.write_all(text.as_bytes())?;
    out.finish()
}

#[async_trait::async_trait]
impl HttpClient for Uplink {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let gzip = parts
            .headers
            .get("content-encoding")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        let body = redact_upload(&body, gzip)?;
        let inner = Arc::clone(&self.inner);
        let headers = parts.headers.clone();
        let sent = self.inner.runtime.spawn(async move {
            let mut request = inner.http.post(inner.track.clone()).body(body);
            // The body may have changed length in redaction: reqwest sets Content-Length itself.
            for (name, value) in headers.iter().filter(|(n, _)| *n != "content-length") {
                request = request.header(name.as_str(), value.as_bytes());
            }
            if let Some(credential) = &inner.credential {
                let token = credential
                    .get_token(&[INGESTION_SCOPE])
                    .await
                    .map_err(|e| format!("no Microsoft Entra token for ingestion: {e}"))?;
                request = request.bearer_auth(token.token.secret());
            }
            let answer = request.send().await.map_err(|e| e.to_string())?;
            let status = answer.status().as_u16();
            let body = answer.bytes().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((status, body))
        });
        let result = match sent.await {
            Ok(result) => result,
            Err(e) => Err(format!("the upload did not run: {e}")),
        };
        match result {
            Ok((status, body)) => {
                if !(200..300).contains(&status) {
                    let text = String::from_utf8_lossy(&body);
                    self.complain(&format!(
                        "HTTP {status}: {}",
                        text.chars().take(300).collect::<String>()
                    ));
                }
                Ok(Response::builder().status(status).body(body)?)
            }
            Err(e) => {
                self.complain(&e);
                Err(e.into())
            }
        }
    }
}

/// The running export: flushed and stopped by [`Telemetry::shutdown`].
pub struct Telemetry {
    pub logs: opentelemetry_sdk::logs::SdkLoggerProvider,
    pub traces: opentelemetry_sdk::trace::SdkTracerProvider,
    metrics: opentelemetry_sdk::metrics::SdkMeterProvider,
}

impl Telemetry {
    /// Builds the three exports over one [`Uplink`] and makes the meter global, so that the
    /// instruments record into it. The log and span layers are taken from `logs` and `traces`.
    pub fn start(target: &Target, uplink: Uplink) -> anyhow::Result<Self> {
        use opentelemetry_application_insights::Exporter;
        let exporter = Exporter::new_from_connection_string(target.for_exporter(), uplink)
            .map_err(|e| anyhow::anyhow!("configuring the Application Insights exporter: {e}"))?;
        let role = std::env::var("WEBSITE_SITE_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "vmss-healer".into());
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(role)
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let logs = opentelemetry_sdk::logs::SdkLoggerProvider::builder()
            .with_resource(resource.clone())
            .with_batch_exporter(exporter.clone())
            .build();
        let traces = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_resource(resource.clone())
            .with_batch_exporter(exporter.clone())
            .build();
        let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(exporter).build();
        let metrics = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(reader)
            .build();
        opentelemetry::global::set_meter_provider(metrics.clone());
        Ok(Telemetry {
            logs,
            traces,
            metrics,
        })
    }

    /// Exports what is buffered and stops. Called off the runtime, before it is dropped: the
    /// uploads run on it.
    pub fn shutdown(self) {
        for (what, result) in [
            ("metrics", self.metrics.shutdown()),
            ("spans", self.traces.shutdown()),
            ("logs", self.logs.shutdown()),
        ] {
            if let Err(e) = result {
                let _ = writeln!(
                    std::io::stderr(),
                    "WARN telemetry: the last {what} could not be exported: {e}"
                );
            }
        }
    }
}

/// The instruments, made on first use from the global meter: after [`Telemetry::start`] when
/// telemetry is on, OpenTelemetry's no-ops otherwise.
struct Instruments {
    unhealthy: Gauge<u64>,
    instances: Gauge<u64>,
    repairs: Counter<u64>,
    brake_held: Gauge<u64>,
    pass_duration: Histogram<f64>,
    mirror_passes: Counter<u64>,
    compute_calls: Counter<u64>,
    throttles: Counter<u64>,
}

fn instruments() -> &'static Instruments {
    static INSTRUMENTS: OnceLock<Instruments> = OnceLock::new();
    INSTRUMENTS.get_or_init(|| {
        let meter = opentelemetry::global::meter("vmss-healer");
        Instruments {
            unhealthy: meter
                .u64_gauge(UNHEALTHY)
                .with_description("instances judged unhealthy, per scale set, each repair pass")
                .build(),
            instances: meter
                .u64_gauge(INSTANCES)
                .with_description("instances mirrored, per scale set, each repair pass")
                .build(),
            repairs: meter
                .u64_counter(REPAIRS)
                .with_description(
                    "journaled repair rows by scale set, action, kind (repair, step, outcome) and outcome",
                )
                .build(),
            brake_held: meter
                .u64_gauge(BRAKE_HELD)
                .with_description("how long a scale set's repairs have been paused, by brake")
                .with_unit("s")
                .build(),
            pass_duration: meter
                .f64_histogram(PASS_DURATION)
                .with_description("how long each invocation took, by function and result")
                .with_unit("s")
                .build(),
            mirror_passes: meter
                .u64_counter(MIRROR_PASSES)
                .with_description("mirror reads by scale set and outcome (synced, fresh, failed, …)")
                .build(),
            compute_calls: meter
                .u64_counter(COMPUTE_CALLS)
                .with_description("Compute API requests by operation and HTTP status")
                .build(),
            throttles: meter
                .u64_counter(THROTTLES)
                .with_description("Compute API answers that asked us to back off, by subscription")
                .build(),
        }
    })
}

/// A repair pass's view of one scale set.
pub fn scale_set_judged(scale_set: &str, total: usize, unhealthy: usize) {
    let set = [KeyValue::new("scale_set", scale_set.to_string())];
    let i = instruments();
    i.instances.record(total as u64, &set);
    i.unhealthy.record(unhealthy as u64, &set);
}

/// A brake held on a scale set this pass, and for how long so far.
pub fn brake_held(scale_set: &str, brake: &'static str, held: Duration) {
    instruments().brake_held.record(
        held.as_secs(),
        &[
            KeyValue::new("scale_set", scale_set.to_string()),
            KeyValue::new("brake", brake),
        ],
    );
}

/// Rows the journal now holds: repairs sent, steps ended, incidents closed or given up.
pub fn journaled(entries: &[Entry]) {
    let i = instruments();
    for e in entries {
        if !matches!(
            e.kind,
            EntryKind::Repair | EntryKind::Step | EntryKind::Outcome
        ) {
            continue;
        }
        i.repairs.add(
            1,
            &[
                KeyValue::new("scale_set", e.scale_set.key()),
                KeyValue::new(
                    "action",
                    e.action.map(|a| a.to_string()).unwrap_or_default(),
                ),
                KeyValue::new("kind", e.kind.as_str()),
                KeyValue::new("outcome", e.outcome.clone()),
                KeyValue::new("dry_run", e.dry_run),
            ],
        );
    }
}

/// One invocation, timed.
pub fn invocation(function: &str, result: &'static str, took: Duration) {
    instruments().pass_duration.record(
        took.as_secs_f64(),
        &[
            KeyValue::new("function", function.to_string()),
            KeyValue::new("result", result),
        ],
    );
}

/// One scale set's mirror read and how it went.
pub fn mirror_pass(scale_set: &str, outcome: &'static str) {
    instruments().mirror_passes.add(
        1,
        &[
            KeyValue::new("scale_set", scale_set.to_string()),
            KeyValue::new("outcome", outcome),
        ],
    );
}

/// One Compute request; `status` is `None` when no answer came.
pub fn compute_call(operation: &'static str, status: Option<u16>) {
    instruments().compute_calls.add(
        1,
        &[
            KeyValue::new("operation", operation),
            KeyValue::new(
                "status",
                status.map_or_else(|| "none".to_string(), |s| s.to_string()),
            ),
        ],
    );
}

/// A Compute answer that asked us to back off.
pub fn throttled(subscription: &str) {
    instruments().throttles.add(
        1,
        &[KeyValue::new("subscription", subscription.to_string())],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_read_as_the_portal_writes_them() {
        let t = Target::parse(
            "InstrumentationKey=00000000-0000-0000-0000-000000000001;IngestionEndpoint=https://westeurope-5.in.applicationinsights.azure.com/;LiveEndpoint=https://westeurope.livediagnostics.monitor.azure.com/;ApplicationId=abc",
            None,
        )
        .unwrap();
        assert_eq!(
            t.track.as_str(),
            "https://westeurope-5.in.applicationinsights.azure.com/v2.1/track"
        );
        assert_eq!(
            t.instrumentation_key,
            "00000000-0000-0000-0000-000000000001"
        );
        assert!(!t.entra);
    }

    #[test]
    fn endpoints_follow_microsofts_defaults() {
        let cases = [
            (
                "instrumentationkey=k;",
                "https://dc.services.visualstudio.com/v2.1/track",
            ),
            (
                "InstrumentationKey=k;EndpointSuffix=ai.contoso.com",
                "https://dc.ai.contoso.com/v2.1/track",
            ),
            (
                "InstrumentationKey=k;EndpointSuffix=ai.contoso.com;Location=westus2",
                "https://westus2.dc.ai.contoso.com/v2.1/track",
            ),
            (
                "InstrumentationKey=k;IngestionEndpoint=http://127.0.0.1:4318",
                "http://127.0.0.1:4318/v2.1/track",
            ),
            (
                "InstrumentationKey=k;IngestionEndpoint=https://proxy.example/ai/",
                "https://proxy.example/ai/v2.1/track",
            ),
        ];
        for (raw, track) in cases {
            assert_eq!(
                Target::parse(raw, None).unwrap().track.as_str(),
                track,
                "{raw}"
            );
        }
    }

    #[test]
    fn unusable_connection_strings_say_why() {
        let cases = [
            (
                "IngestionEndpoint=https://x.example",
                "no InstrumentationKey",
            ),
            ("InstrumentationKey", "not `key=value`"),
            (
                "InstrumentationKey=k;IngestionEndpoint=http://collector.example",
                "must be https",
            ),
            (
                "InstrumentationKey=k;IngestionEndpoint=not a url",
                "is not a URL",
            ),
            (
                "InstrumentationKey=k;Authorization=aad",
                "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
            ),
        ];
        for (raw, says) in cases {
            let e = Target::parse(raw, None).unwrap_err();
            assert!(e.contains(says), "{raw}: {e}");
        }
    }

    #[test]
    fn entra_authentication_follows_the_hosts_setting() {
        let cs = "InstrumentationKey=k";
        assert!(Target::parse(cs, Some("Authorization=AAD")).unwrap().entra);
        assert!(Target::parse(cs, Some(" ")).map(|t| !t.entra).unwrap());
        let e = Target::parse(cs, Some("Authorization=AAD;ClientId=1234")).unwrap_err();
        assert!(e.contains("user-assigned"), "{e}");
        let e = Target::parse(cs, Some("Authorization=key")).unwrap_err();
        assert!(e.contains("Authorization=AAD"), "{e}");
    }

    #[test]
    fn uploads_leave_redacted_and_otherwise_intact() {
        crate::secret::register(
            "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=c2VjcmV0LWtleS12YWx1ZQ==",
        );
        let envelope = r#"[{"name":"Microsoft.ApplicationInsights.Message","iKey":"00000000-0000-0000-0000-000000000001","data":{"baseData":{"message":"storage said: AccountKey=c2VjcmV0LWtleS12YWx1ZQ== was refused","properties":{"scale_set":"web"}}}}]"#;
        for gzip in [false, true] {
            let body = if gzip {
                let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                z.write_all(envelope.as_bytes()).unwrap();
                z.finish().unwrap()
            } else {
                envelope.as_bytes().to_vec()
            };
            let out = redact_upload(&body, gzip).unwrap();
            let text = if gzip {
                let mut s = String::new();
                flate2::read::GzDecoder::new(&out[..])
                    .read_to_string(&mut s)
                    .unwrap();
                s
            } else {
                String::from_utf8(out).unwrap()
            };
            assert!(!text.contains("c2VjcmV0LWtleS12YWx1ZQ"), "{text}");
            assert!(text.contains(crate::secret::MASK), "{text}");
            // What ingestion needs is untouched: the key, the names, the JSON itself.
            assert!(
                text.contains(r#""iKey":"00000000-0000-0000-0000-000000000001""#),
                "{text}"
            );
            let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(
                parsed[0]["data"]["baseData"]["properties"]["scale_set"],
                "web"
            );
        }
    }
}
