//! What every event payload has in common: a fixed type name and an explicit version.
//!
//! The crate-private `domain_events!` macro is the single table per aggregate
//! that lists its event types and their versions. From that table it builds the event enum, its
//! [`cqrs_es::DomainEvent`] impl and the schema list, so bumping a version to "2" is a one-line
//! change and the enum, the stored `event_version` and the schema file name cannot disagree.

/// A versioned event payload struct; one per event type.
pub trait EventPayload {
    /// The aggregate type this event belongs to (`Aggregate::TYPE`).
    const AGGREGATE_TYPE: &'static str;
    /// The event type name, equal to the enum variant and the payload struct name.
    const EVENT_TYPE: &'static str;
    /// The payload version; bumped (with an upcaster) on any change that is not an added
    /// optional field.
    const VERSION: &'static str;
}

/// Builds an aggregate's event enum from a table of `PayloadStruct => "version"` rows.
///
/// Each variant wraps the payload struct of the same name, so the serialized form is
/// `{"PayloadStruct": {..}}` and the variant name is the event type.
macro_rules! domain_events {
    (
        $(#[$enum_meta:meta])*
        pub enum $enum:ident for $aggregate:expr => {
            $( $(#[$variant_meta:meta])* $variant:ident => $version:literal ),+ $(,)?
        }
    ) => {
        $(#[$enum_meta])*
        #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
        pub enum $enum {
            $( $(#[$variant_meta])* $variant($variant), )+
        }

        $(
            impl $crate::event::EventPayload for $variant {
                const AGGREGATE_TYPE: &'static str = $aggregate;
                const EVENT_TYPE: &'static str = stringify!($variant);
                const VERSION: &'static str = $version;
            }

            impl From<$variant> for $enum {
                fn from(payload: $variant) -> Self {
                    Self::$variant(payload)
                }
            }
        )+

        impl cqrs_es::DomainEvent for $enum {
            fn event_type(&self) -> String {
                match self {
                    $( Self::$variant(_) => {
                        <$variant as $crate::event::EventPayload>::EVENT_TYPE.to_owned()
                    } )+
                }
            }

            fn event_version(&self) -> String {
                match self {
                    $( Self::$variant(_) => {
                        <$variant as $crate::event::EventPayload>::VERSION.to_owned()
                    } )+
                }
            }
        }

        impl $enum {
            /// The JSON Schema of every event type of this aggregate, in table order.
            pub fn schemas() -> Vec<$crate::schema::EventSchema> {
                vec![ $( $crate::schema::EventSchema::of::<$variant>(), )+ ]
            }
        }
    };
}

pub(crate) use domain_events;
