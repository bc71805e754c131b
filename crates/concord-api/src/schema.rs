//! Schemas the derive cannot spell: JSON values a store can keep, and the expected version's
//! two shapes. Each is written once here as JSON Schema and referenced by the bodies that use it.

use std::borrow::Cow;

use utoipa::openapi::schema::{ArrayBuilder, KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, Type};
use utoipa::openapi::{Ref, RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

/// The pattern of a name made of the stream-name alphabet (`A-Z a-z 0-9 - _ . : @`), optionally
/// after one leading `$`, not starting with `-`: stream names, consumer groups. At most 200
/// characters.
pub const STREAM_NAME_PATTERN: &str = r"^\$?[A-Za-z0-9_.:@][A-Za-z0-9_.:@-]*$";
/// A stream category: a stream name without `-`.
pub const CATEGORY_PATTERN: &str = r"^\$?[A-Za-z0-9_.:@]+$";
/// An event type: 1–200 of `A-Z a-z 0-9 - _ . : /`.
pub const EVENT_TYPE_PATTERN: &str = r"^[A-Za-z0-9_.:/-]+$";
/// A saga definition's name or a step's: 1–64 of `A-Z a-z 0-9 _ -`.
pub const NAME_PATTERN: &str = r"^[A-Za-z0-9_-]+$";
/// A saga id: 1–128 of `A-Z a-z 0-9 _ - . :`.
pub const SAGA_ID_PATTERN: &str = r"^[A-Za-z0-9_.:-]+$";
/// Text a store can keep: anything but U+0000.
pub const STORABLE_TEXT_PATTERN: &str = r"^[^\u0000]*$";

fn of_type(t: Type) -> ObjectBuilder {
    ObjectBuilder::new().schema_type(t)
}

fn storable_text() -> ObjectBuilder {
    of_type(Type::String).pattern(Some(STORABLE_TEXT_PATTERN))
}

/// An object whose keys are storable text and whose values are [`StorableJson`].
fn storable_object() -> ObjectBuilder {
    of_type(Type::Object)
        .property_names(Some(storable_text()))
        .additional_properties(Some(Ref::from_schema_name("StorableJson")))
}

/// Any JSON value that holds no U+0000 in a string or an object key: what event data and
/// metadata, saga inputs and participant payloads may be (no database keeps U+0000 in JSON).
pub struct StorableJson;

impl PartialSchema for StorableJson {
    fn schema() -> RefOr<Schema> {
        let one_of = OneOfBuilder::new()
            .description(Some("Any JSON value without the character U+0000 in a string or a key"))
            .item(of_type(Type::Null))
            .item(of_type(Type::Boolean))
            .item(of_type(Type::Number))
            .item(storable_text())
            .item(ArrayBuilder::new().items(Ref::from_schema_name("StorableJson")))
            .item(storable_object())
            .build();
        RefOr::T(Schema::OneOf(one_of))
    }
}

impl ToSchema for StorableJson {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("StorableJson")
    }
}

/// A JSON object of [`StorableJson`] values: event metadata, vault metadata.
pub struct StorableObject;

impl PartialSchema for StorableObject {
    fn schema() -> RefOr<Schema> {
        storable_object().build().into()
    }
}

impl ToSchema for StorableObject {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("StorableObject")
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((StorableJson::name().into_owned(), StorableJson::schema()));
    }
}

/// `"any"`, `"no_stream"`, `"exists"` or the stream's current version.
pub struct ExpectedVersionSchema;

impl PartialSchema for ExpectedVersionSchema {
    fn schema() -> RefOr<Schema> {
        let one_of = OneOfBuilder::new()
            .description(Some(
                "\"any\" (the default), \"no_stream\", \"exists\" or the stream's current version",
            ))
            .item(of_type(Type::String).enum_values(Some(["any", "no_stream", "exists"])))
            .item(
                of_type(Type::Integer)
                    .minimum(Some(0))
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64))),
            )
            .build();
        RefOr::T(Schema::OneOf(one_of))
    }
}

impl ToSchema for ExpectedVersionSchema {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ExpectedVersion")
    }
}

/// The vault's value types.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum ValueType {
    Card,
    Ssn,
    Email,
    Phone,
    Generic,
}

/// How a token looks.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum TokenFormat {
    Random,
    Uuid,
    Last4,
}

/// What a detokenize reveals.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum Reveal {
    Plain,
    Masked,
}

/// A token: 1–64 of `A-Z a-z 0-9 _ -`.
#[derive(ToSchema)]
#[schema(value_type = String, pattern = r"^[A-Za-z0-9_-]+$", min_length = 1, max_length = 64)]
#[allow(dead_code)]
pub struct TokenText(String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hand_written_schemas_parse() {
        for schema in [
            StorableJson::schema(),
            StorableObject::schema(),
            ExpectedVersionSchema::schema(),
        ] {
            let json = serde_json::to_value(&schema).unwrap();
            assert!(json.is_object(), "{json}");
        }
        let json = serde_json::to_value(StorableJson::schema()).unwrap();
        assert_eq!(json["oneOf"].as_array().unwrap().len(), 6, "{json}");
        assert_eq!(
            json["oneOf"][5]["additionalProperties"]["$ref"],
            "#/components/schemas/StorableJson"
        );
        assert_eq!(json["oneOf"][5]["propertyNames"]["pattern"], STORABLE_TEXT_PATTERN);
    }
}
