//! Which credential the handler uses for Resource Manager and identity-based storage (design §5).

use anyhow::{bail, Context};
use azure_core::auth::TokenCredential;
use azure_identity::{AppServiceManagedIdentityCredential, TokenCredentialOptions};
use std::sync::Arc;

/// In a Function App (and against the simulator) `IDENTITY_ENDPOINT` is set: use the App Service
/// managed identity. Elsewhere fall back to the SDK's environment/CLI chain for local runs.
pub fn credential(client_id: Option<&str>) -> anyhow::Result<Arc<dyn TokenCredential>> {
    let client_id = client_id.map(str::to_string).or_else(|| {
        std::env::var("AZURE_CLIENT_ID")
            .ok()
            .filter(|v| !v.is_empty())
    });
    if std::env::var_os("IDENTITY_ENDPOINT").is_some() {
        if let Some(id) = client_id {
            // azure_identity 0.21's App Service credential always asks for the system-assigned
            // identity; using it for a user-assigned one would silently act as the wrong principal.
            bail!(
                "a user-assigned identity ({id}) was requested via AZURE_CLIENT_ID or __clientId, but this build supports only the Function App's system-assigned identity; unset it"
            );
        }
        let credential =
            AppServiceManagedIdentityCredential::create(TokenCredentialOptions::default())
                .context(
                    "IDENTITY_ENDPOINT is set but the App Service managed identity cannot be used",
                )?;
        return Ok(Arc::new(credential));
    }
    azure_identity::create_credential()
        .context("no managed identity (IDENTITY_ENDPOINT unset) and no developer credential found")
}
