//! The OpenCode configuration a worker passes in `OPENCODE_CONFIG_CONTENT`.
//!
//! Passing it by environment keeps the user's repository untouched; OpenCode merges it over the
//! global and project config, so what is set here wins.

use serde_json::{Map, Value, json};

use crate::types::{ModelRef, PermissionAction};

/// An OpenAI-compatible model provider. OpenCode bundles `@ai-sdk/openai-compatible`, so nothing
/// is downloaded for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderConfig {
    /// The id OpenCode knows the provider by (`providerID` in prompts).
    pub provider_id: String,
    /// Up to and including `/v1`: OpenCode posts to `{base_url}/chat/completions`.
    pub base_url: String,
    pub api_key: String,
    pub model_id: String,
}

impl ProviderConfig {
    /// The model to name in every prompt.
    pub fn model(&self) -> ModelRef {
        ModelRef::new(&self.provider_id, &self.model_id)
    }
}

/// A whole OpenCode config: one provider and model (also used for session titles), only that
/// provider enabled, no sharing or auto-update, and permission rules.
#[derive(Debug, Clone)]
pub struct OpenCodeConfig {
    pub provider: ProviderConfig,
    /// Permission name (`bash`, `edit`, ...) to action, in config order.
    pub permissions: Vec<(String, PermissionAction)>,
}

impl OpenCodeConfig {
    pub fn new(provider: ProviderConfig) -> Self {
        Self {
            provider,
            permissions: Vec::new(),
        }
    }

    pub fn permission(mut self, name: impl Into<String>, action: PermissionAction) -> Self {
        self.permissions.push((name.into(), action));
        self
    }

    /// The JSON for `OPENCODE_CONFIG_CONTENT`.
    pub fn to_json(&self) -> Value {
        let provider = &self.provider;
        let model = format!("{}/{}", provider.provider_id, provider.model_id);
        let permission: Map<String, Value> = self
            .permissions
            .iter()
            .map(|(name, action)| (name.clone(), json!(action)))
            .collect();
        json!({
            "provider": {
                provider.provider_id.clone(): {
                    "npm": "@ai-sdk/openai-compatible",
                    "name": provider.provider_id,
                    "options": { "baseURL": provider.base_url, "apiKey": provider.api_key },
                    "models": { provider.model_id.clone(): { "name": provider.model_id } },
                }
            },
            "model": model,
            // Title generation uses the small model; without one OpenCode picks some other.
            "small_model": model,
            // Otherwise the built-in hosted provider is listed too, useless offline.
            "enabled_providers": [provider.provider_id],
            "autoupdate": false,
            "share": "disabled",
            "permission": permission,
        })
    }
}
