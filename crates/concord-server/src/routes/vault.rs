//! The tokenization vault: tokenize, detokenize, tokenized-field rules, erasure, rotation.

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use concord_api::ErrorCode;
use concord_api::vault::{
    DetokenizeBody, Detokenized, DetokenizedItem, ErasedOut, RotatedOut, RulesBody, RulesOut, TokenizeBody, Tokenized,
};
use concord_core::app::vault::{Reveal, TokenizeItem};
use concord_core::domain::vault::{Subject, Token, TokenFormat, TokenType};
use concord_core::domain::{Category, Principal};
use concord_sdk::idempotency::DoNotStore;
use serde::Deserialize;
use utoipa::IntoParams;
use zeroize::Zeroizing;

/// A stream category named in the path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct CategoryPath {
    /// A stream name without `-`, and not a system stream's (`$...`): those take no rules.
    #[param(pattern = r"^[A-Za-z0-9_.:@]+$", min_length = 1, max_length = 200)]
    pub category: String,
}

/// A data subject named in the path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct SubjectPath {
    /// 1–200 bytes without control characters or `/` (printable ASCII here).
    #[param(pattern = r"^[ -.0-~]+$", min_length = 1, max_length = 200)]
    pub subject: String,
}

/// A body the vault routes cannot parse: the parser's message without the values it quotes
/// (a card number sent as a JSON number would be repeated in the answer, and so in any stored
/// replay of it).
fn redacted(r: JsonRejection) -> ApiError {
    let mut e = ApiError::from(r);
    let mut out = String::with_capacity(e.detail.len());
    for (i, part) in e.detail.split('`').enumerate() {
        out.push_str(if i % 2 == 1 { "…" } else { part });
    }
    e.detail = out;
    e
}

/// Tokenizes values; one token per item, in order.
#[utoipa::path(post, path = "/v1/vault/tokenize", tag = "vault",
    security(("bearer" = ["vault:tokenize"])),
    request_body = TokenizeBody,
    responses(
        (status = 200, description = "One token per item, in order", body = Tokenized),
        (status = 400, description = "invalid_value, invalid_value_type, value_too_large, invalid_token_format, invalid_subject, invalid_vault_item, vault_batch_size or invalid_parameter: nothing written"),
    ))]
pub async fn tokenize(
    State(state): State<AppState>,
    body: Result<Json<TokenizeBody>, JsonRejection>,
) -> Result<Json<Tokenized>, ApiError> {
    let Json(body) = body.map_err(redacted)?;
    let items = body
        .items
        .into_iter()
        .map(|i| {
            let format = match i.format.as_deref() {
                None | Some("random") => TokenFormat::Random,
                Some("uuid") => TokenFormat::Uuid,
                Some("last4") => TokenFormat::Last4,
                Some(_) => return Err(ApiError::parameter("format", "must be random, uuid or last4")),
            };
            Ok(TokenizeItem {
                kind: TokenType::parse(&i.kind)?,
                value: Zeroizing::new(i.value),
                format,
                convergent: i.convergent.unwrap_or(false),
                subject: i.subject.as_deref().map(Subject::parse).transpose()?,
                ttl_s: i.ttl_s,
                metadata: i.metadata,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let tokens = state.vault.tokenize(items).await?;
    Ok(Json(Tokenized {
        tokens: tokens.into_iter().map(Token::into_string).collect(),
    }))
}

/// Reveals tokens, each allowed by the key's detokenize scope of its type. Answers revealed
/// values, so the response is marked as a secret: an `Idempotency-Key` never stores it (stored
/// responses are plaintext).
#[utoipa::path(post, path = "/v1/vault/detokenize", tag = "vault",
    security(("bearer" = [])),
    request_body = DetokenizeBody,
    responses(
        (status = 200, description = "Each item's value or error (not_found, expired, erased, corrupted); audited; never stored for replay", body = Detokenized),
        (status = 400, description = "invalid_token, vault_batch_size or invalid_parameter"),
        (status = 403, description = "Some item's type needs a vault:detokenize scope this key lacks: nothing revealed, audited"),
        (status = 429, description = "rate_limited: over this key's detokenize rate; see Retry-After"),
    ))]
pub async fn detokenize(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<DetokenizeBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(redacted)?;
    let reveal = match body.reveal.as_deref() {
        None | Some("plain") => Reveal::Plain,
        Some("masked") => Reveal::Masked,
        Some(_) => return Err(ApiError::parameter("reveal", "must be plain or masked")),
    };
    let tokens = body
        .tokens
        .iter()
        .map(|t| Token::parse(t))
        .collect::<Result<Vec<_>, _>>()?;
    let items = state.vault.detokenize(&principal, tokens, reveal).await?;
    let out = Detokenized {
        items: items
            .into_iter()
            .map(|i| DetokenizedItem {
                token: i.token,
                kind: i.kind.map(|k| k.as_str().to_owned()),
                value: i.value.map(|v| v.as_str().to_owned()),
                metadata: i.metadata,
                error: i.error.map(|e| e.as_str().to_owned()),
            })
            .collect(),
    };
    let mut resp = Json(out).into_response();
    resp.extensions_mut().insert(DoNotStore);
    Ok(resp)
}

fn category(raw: &str) -> Result<Category, ApiError> {
    let c = Category::parse(raw)?;
    if c.as_str().starts_with('$') {
        return Err(ApiError::new(
            ErrorCode::InvalidVaultRule,
            "system streams ($...) take no rules",
        ));
    }
    Ok(c)
}

/// Stores the tokenized-field rules of a stream category.
#[utoipa::path(put, path = "/v1/vault/rules/{category}", tag = "vault",
    security(("bearer" = ["vault:admin"])),
    params(CategoryPath), request_body = RulesBody,
    responses(
        (status = 200, description = "Stored; appends to the category tokenize these fields", body = RulesOut),
        (status = 400, description = "invalid_vault_rule or invalid_stream_name"),
    ))]
pub async fn put_rules(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(CategoryPath { category: raw }): Path<CategoryPath>,
    body: Result<Json<RulesBody>, JsonRejection>,
) -> Result<Json<RulesOut>, ApiError> {
    let category = category(&raw)?;
    let Json(body) = body.map_err(redacted)?;
    let rules = state
        .vault
        .put_rules(&principal, category.as_str(), &body.fields)
        .await?;
    Ok(Json(RulesOut {
        category: category.as_str().to_owned(),
        fields: rules.to_json(),
    }))
}

/// The tokenized-field rules of a stream category.
#[utoipa::path(get, path = "/v1/vault/rules/{category}", tag = "vault",
    security(("bearer" = ["vault:admin"])),
    params(CategoryPath),
    responses(
        (status = 200, description = "The category's rules", body = RulesOut),
        (status = 400, description = "invalid_stream_name"),
        (status = 404, description = "not_found"),
    ))]
pub async fn get_rules(
    State(state): State<AppState>,
    Path(CategoryPath { category: raw }): Path<CategoryPath>,
) -> Result<Json<RulesOut>, ApiError> {
    let category = category(&raw)?;
    let rules = state
        .vault
        .rules(category.as_str())
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no rules for this category"))?;
    Ok(Json(RulesOut {
        category: category.as_str().to_owned(),
        fields: rules.to_json(),
    }))
}

/// Crypto-shredding: deletes a subject's data key.
#[utoipa::path(delete, path = "/v1/vault/subjects/{subject}", tag = "vault",
    security(("bearer" = ["vault:admin"])),
    params(SubjectPath),
    responses(
        (status = 200, description = "The subject's data key is deleted: its tokens answer erased", body = ErasedOut),
        (status = 400, description = "invalid_subject"),
    ))]
pub async fn erase_subject(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(SubjectPath { subject: raw }): Path<SubjectPath>,
) -> Result<Response, ApiError> {
    let subject = Subject::parse(&raw)?;
    let erased = state.vault.erase_subject(&principal, &subject).await?;
    let mut resp = Json(ErasedOut {
        subject: subject.as_str().to_owned(),
        erased,
    })
    .into_response();
    // The answer names the erased subject: it is not kept for replay.
    resp.extensions_mut().insert(DoNotStore);
    Ok(resp)
}

/// Adds a master key version that re-wraps every data key.
#[utoipa::path(post, path = "/v1/vault/keys/rotate", tag = "vault",
    security(("bearer" = ["vault:admin"])),
    responses(
        (status = 200, description = "A new master key version wraps every data key", body = RotatedOut),
    ))]
pub async fn rotate(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<RotatedOut>, ApiError> {
    let r = state.vault.rotate(&principal).await?;
    Ok(Json(RotatedOut {
        master_key_version: r.master_key_version,
        rewrapped: r.rewrapped,
    }))
}
