//! What each authenticated operation needs, read off the security requirements the handlers
//! declare in the OpenAPI document: the route table and the document cannot disagree.

use axum::http::Method;
use concord_core::domain::Scope;
use serde_json::Value;
use std::collections::HashMap;

/// The scopes an operation's security requirement names: `None` for a public operation, an
/// empty list for one any valid key may call.
#[must_use]
pub fn required_scopes(op: &Value) -> Option<Vec<String>> {
    let requirements = op.get("security")?.as_array()?;
    let bearer = requirements.iter().find_map(|r| r.get("bearer"))?;
    Some(
        bearer
            .as_array()
            .map(|scopes| scopes.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default(),
    )
}

/// What an operation needs: a scope, or only a valid key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    Scope(Scope),
    AnyKey,
}

/// What each authenticated operation needs, read off the security requirements of the OpenAPI
/// document, where each handler declares it: the route table and the document cannot disagree.
/// An operation behind authentication that declares nothing is refused to every key.
#[derive(Debug, Default)]
pub struct RouteScopes(HashMap<(String, String), Need>);

/// An operation's declared security the server cannot enforce.
#[derive(Debug, thiserror::Error)]
#[error("{method} {path}: {reason}")]
pub struct DeclarationError {
    method: String,
    path: String,
    reason: String,
}

impl RouteScopes {
    /// # Errors
    /// When an operation names an unknown scope or more than one.
    pub fn from_document(doc: &Value) -> Result<Self, DeclarationError> {
        let mut needs = HashMap::new();
        let paths = doc.get("paths").and_then(Value::as_object).into_iter().flatten();
        for (path, item) in paths {
            let ops = item.as_object().into_iter().flatten();
            for (method, op) in ops {
                let Some(scopes) = required_scopes(op) else {
                    continue;
                };
                let error = |reason: String| DeclarationError {
                    method: method.to_uppercase(),
                    path: path.clone(),
                    reason,
                };
                let need = match scopes.as_slice() {
                    [] => Need::AnyKey,
                    [one] => Need::Scope(Scope::parse(one).map_err(|e| error(e.to_string()))?),
                    _ => return Err(error("an operation needs one scope at most".into())),
                };
                needs.insert((method.to_uppercase(), path.clone()), need);
            }
        }
        Ok(Self(needs))
    }

    /// What `method` on the route template `route` needs; `None`: nothing grants it.
    #[must_use]
    pub fn need(&self, method: &Method, route: &str) -> Option<&Need> {
        self.0.get(&(method.as_str().to_owned(), route.to_owned()))
    }
}
