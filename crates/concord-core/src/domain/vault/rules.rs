//! Tokenized event fields: the fields of a stream category's events that hold personal data and
//! are replaced by tokens before the event is stored.

use super::VaultError;
use super::token::TokenFormat;
use super::value::TokenType;
use serde_json::{Map, Value, json};

/// One field: a JSON pointer into the event's `data`, the type of its value and its token format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRule {
    pub pointer: String,
    pub kind: TokenType,
    pub format: TokenFormat,
}

/// The rules of one category, in pointer order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldRules {
    pub fields: Vec<FieldRule>,
}

/// The longest JSON pointer of a rule, bytes.
const MAX_POINTER_LEN: usize = 512;

impl FieldRules {
    /// Parses `{"/pointer": "type" | {"type", "format"?}, ...}`.
    ///
    /// # Errors
    /// [`VaultError::InvalidRule`] for a pointer that is not an RFC 6901 pointer into the data,
    /// an unknown type or format, or more than `max_fields` fields.
    pub fn parse(fields: &Map<String, Value>, max_fields: usize) -> Result<Self, VaultError> {
        if fields.len() > max_fields {
            return Err(VaultError::InvalidRule(format!(
                "{} fields, over the limit of {max_fields}",
                fields.len()
            )));
        }
        let mut out = Vec::with_capacity(fields.len());
        for (pointer, spec) in fields {
            if !pointer.starts_with('/') || pointer.len() > MAX_POINTER_LEN {
                return Err(VaultError::InvalidRule(format!(
                    "{:?} is not a JSON pointer into the event data (it starts with / and is at most {MAX_POINTER_LEN} bytes)",
                    pointer.chars().take(64).collect::<String>()
                )));
            }
            if has_bad_escape(pointer) {
                return Err(VaultError::InvalidRule(format!(
                    "{pointer:?}: ~ must be followed by 0 or 1"
                )));
            }
            let (kind, format) = match spec {
                Value::String(t) => (t.as_str(), None),
                Value::Object(o) => (
                    o.get("type").and_then(Value::as_str).unwrap_or(""),
                    o.get("format").and_then(Value::as_str),
                ),
                _ => ("", None),
            };
            let kind = TokenType::parse(kind).map_err(|_| {
                VaultError::InvalidRule(format!(
                    "{pointer}: the type must be one of card, ssn, email, phone, generic"
                ))
            })?;
            let format = match format {
                None | Some("random") => TokenFormat::Random,
                Some("uuid") => TokenFormat::Uuid,
                Some("last4") => TokenFormat::Last4,
                Some(_) => {
                    return Err(VaultError::InvalidRule(format!(
                        "{pointer}: the format must be random, uuid or last4"
                    )));
                }
            };
            format
                .check(kind)
                .map_err(|e| VaultError::InvalidRule(format!("{pointer}: {e}")))?;
            out.push(FieldRule {
                pointer: pointer.clone(),
                kind,
                format,
            });
        }
        out.sort_by(|a, b| a.pointer.cmp(&b.pointer));
        Ok(Self { fields: out })
    }

    /// The rules as stored and answered: `{"/pointer": {"type", "format"}}`.
    #[must_use]
    pub fn to_json(&self) -> Value {
        let fields: Map<String, Value> = self
            .fields
            .iter()
            .map(|f| {
                (
                    f.pointer.clone(),
                    json!({"type": f.kind.as_str(), "format": f.format.as_str()}),
                )
            })
            .collect();
        Value::Object(fields)
    }

    /// The values the rules name in `data`: (rule index, value as text). A field that is absent
    /// or null is left alone; a number is taken as its decimal text (a card number sent as a JSON
    /// number).
    ///
    /// # Errors
    /// [`VaultError::InvalidValue`] for a field holding an object, array or boolean.
    pub fn values_in(&self, data: &Value) -> Result<Vec<(usize, String)>, VaultError> {
        let mut out = Vec::new();
        for (i, rule) in self.fields.iter().enumerate() {
            match data.pointer(&rule.pointer) {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => out.push((i, s.clone())),
                Some(Value::Number(n)) => out.push((i, n.to_string())),
                Some(_) => {
                    return Err(VaultError::InvalidValue {
                        kind: rule.kind,
                        reason: "a tokenized field holds a string or a number",
                    });
                }
            }
        }
        Ok(out)
    }

    /// Puts `token` where rule `index` points in `data`.
    pub fn replace(&self, data: &mut Value, index: usize, token: &str) {
        if let Some(slot) = self.fields.get(index).and_then(|r| data.pointer_mut(&r.pointer)) {
            *slot = Value::String(token.to_owned());
        }
    }
}

fn has_bad_escape(pointer: &str) -> bool {
    let b = pointer.as_bytes();
    b.iter()
        .enumerate()
        .any(|(i, c)| *c == b'~' && !matches!(b.get(i + 1), Some(b'0' | b'1')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(v: Value) -> Result<FieldRules, VaultError> {
        FieldRules::parse(v.as_object().unwrap(), 64)
    }

    #[test]
    fn rules_name_fields_by_pointer_with_a_type_and_an_optional_format() {
        let r = rules(json!({"/email": "email", "/card/number": {"type": "card", "format": "last4"}})).unwrap();
        assert_eq!(r.fields[0].pointer, "/card/number");
        assert_eq!(r.fields[0].format, TokenFormat::Last4);
        assert_eq!(r.fields[1].kind, TokenType::Email);
        assert_eq!(rules(r.to_json()).unwrap(), r);
    }

    #[test]
    fn bad_rules_are_refused() {
        for bad in [
            json!({"email": "email"}),
            json!({"/email": "passport"}),
            json!({"/email": {"type": "email", "format": "last4"}}),
            json!({"/a~2b": "generic"}),
            json!({"/email": 3}),
        ] {
            assert!(rules(bad.clone()).is_err(), "{bad}");
        }
        let many: Map<String, Value> = (0..3).map(|i| (format!("/f{i}"), json!("generic"))).collect();
        assert!(FieldRules::parse(&many, 2).is_err());
    }

    #[test]
    fn values_are_found_and_replaced_in_place() {
        let r = rules(json!({"/email": "email", "/card/number": "card", "/missing": "ssn"})).unwrap();
        let mut data = json!({"email": "ada@example.com", "card": {"number": 4242424242424242_u64}, "other": 1});
        let found = r.values_in(&data).unwrap();
        assert_eq!(
            found,
            vec![(0, "4242424242424242".into()), (1, "ada@example.com".into())]
        );
        r.replace(&mut data, 0, "tok_a");
        r.replace(&mut data, 1, "tok_b");
        assert_eq!(data, json!({"email": "tok_b", "card": {"number": "tok_a"}, "other": 1}));
        assert!(r.values_in(&json!({"email": {"nested": 1}})).is_err());
    }
}
