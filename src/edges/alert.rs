//! Alerts to `HEALER_WEBHOOK_URL`: a JSON POST on repair, give-up, pause and resume, and when a
//! long-running operation needs the operator (a failed batch, a failed cycle). Delivery runs
//! in the background with bounded retries, so a slow or dead webhook never delays a repair.

use serde::Serialize;
use std::time::Duration;
use time::OffsetDateTime;
use url::Url;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Repair,
    GiveUp,
    Pause,
    Resume,
    /// A long-running operation stopped for the operator (`incident` is its id).
    Operation,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    pub kind: Kind,
    /// The scale set's resource id.
    pub scale_set: String,
    pub instance: Option<String>,
    pub incident: Option<String>,
    pub action: Option<String>,
    pub attempt: Option<u32>,
    /// Why, in one sentence.
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub dry_run: bool,
}

/// Delivery schedule: attempts and the wait before each retry.
const BACKOFF: [Duration; 3] = [
    Duration::from_millis(500),
    Duration::from_secs(2),
    Duration::from_secs(8),
];
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Notifier {
    url: Option<Url>,
    http: reqwest::Client,
}

impl Notifier {
    pub fn new(url: Option<Url>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .unwrap_or_default();
        Notifier { url, http }
    }

    /// Sends alerts in the background and returns at once.
    pub fn send(&self, alerts: Vec<Alert>) {
        let Some(url) = self.url.clone() else { return };
        if alerts.is_empty() {
            return;
        }
        let http = self.http.clone();
        tokio::spawn(async move {
            for alert in alerts {
                deliver(&http, &url, &alert).await;
            }
        });
    }
}

async fn deliver(http: &reqwest::Client, url: &Url, alert: &Alert) {
    let mut waits = BACKOFF.iter();
    loop {
        let failure = match http.post(url.clone()).json(alert).send().await {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => format!("HTTP {}", r.status()),
            // Without the URL: a webhook's token is often in its query or path.
            Err(e) => e.without_url().to_string(),
        };
        let webhook = origin(url);
        match waits.next() {
            Some(wait) => {
                tracing::warn!(kind = ?alert.kind, scale_set = %alert.scale_set, %webhook, error = %failure, retry_in_ms = wait.as_millis() as u64, "webhook delivery failed; retrying");
                tokio::time::sleep(*wait).await;
            }
            None => {
                tracing::error!(kind = ?alert.kind, scale_set = %alert.scale_set, %webhook, error = %failure, "webhook delivery failed; alert dropped after retries");
                return;
            }
        }
    }
}

/// Where alerts go, for a log line: scheme, host and port only.
fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}
