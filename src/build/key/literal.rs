//! How a literal enters a key (`key.rs` rule 3): what its `Serialize`
//! does, call by call, each call under a tag of its own.
//!
//! A compact encoding such as postcard's says nothing of what it wrote, so
//! two values of one type could write the same bytes through different
//! calls: `serde_json::Value`'s `false` and `0` (a bool, then a `u64`,
//! each one byte 0), an untagged enum's variants over one number, a struct
//! whose optional fields serde skips when empty (`a: Some(5)` and
//! `b: Some(5)`). Hashed as keys, such values were one task, and a graph
//! holding both gave one's value to the other. Rules:
//!
//! 1. Every value starts with a tag naming the serde call that wrote it,
//!    and integers carry their width: a `u8` 1 is not a `u64` 1.
//! 2. Every value ends where it can be told to: a number or a character
//!    after its fixed width, a string or bytes after their length, a
//!    compound (sequence, tuple, map, struct, and their variants) at an end
//!    tag no value starts with. So the encoding of a list of values is
//!    that list's alone (prefix-free), however its values nest.
//! 3. Names count: a struct's and a variant's name and index, each field's
//!    name, and a field serde skips, by name.
//! 4. It is what the type writes for a compact format
//!    (`is_human_readable` is false), as on the wire.

use std::fmt;

use serde::ser::{self, Serialize};

use super::KeyHasher;

/// A literal's `Serialize` failed; its message.
#[derive(Debug)]
pub(crate) struct LiteralError(pub(crate) String);

impl fmt::Display for LiteralError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LiteralError {}

impl ser::Error for LiteralError {
    fn custom<T: fmt::Display>(message: T) -> Self {
        LiteralError(message.to_string())
    }
}

/// The tags (rule 1). None is `END`, `KEY`, `FIELD` or `SKIPPED`,
/// which start no value (rule 2).
mod tag {
    pub(super) const BOOL: u8 = 0x01;
    pub(super) const I8: u8 = 0x02;
    pub(super) const I16: u8 = 0x03;
    pub(super) const I32: u8 = 0x04;
    pub(super) const I64: u8 = 0x05;
    pub(super) const I128: u8 = 0x06;
    pub(super) const U8: u8 = 0x07;
    pub(super) const U16: u8 = 0x08;
    pub(super) const U32: u8 = 0x09;
    pub(super) const U64: u8 = 0x0a;
    pub(super) const U128: u8 = 0x0b;
    pub(super) const F32: u8 = 0x0c;
    pub(super) const F64: u8 = 0x0d;
    pub(super) const CHAR: u8 = 0x0e;
    pub(super) const STR: u8 = 0x0f;
    pub(super) const BYTES: u8 = 0x10;
    pub(super) const NONE: u8 = 0x11;
    pub(super) const SOME: u8 = 0x12;
    pub(super) const UNIT: u8 = 0x13;
    pub(super) const UNIT_STRUCT: u8 = 0x14;
    pub(super) const UNIT_VARIANT: u8 = 0x15;
    pub(super) const NEWTYPE_STRUCT: u8 = 0x16;
    pub(super) const NEWTYPE_VARIANT: u8 = 0x17;
    pub(super) const SEQ: u8 = 0x18;
    pub(super) const TUPLE: u8 = 0x19;
    pub(super) const TUPLE_STRUCT: u8 = 0x1a;
    pub(super) const TUPLE_VARIANT: u8 = 0x1b;
    pub(super) const MAP: u8 = 0x1c;
    pub(super) const STRUCT: u8 = 0x1d;
    pub(super) const STRUCT_VARIANT: u8 = 0x1e;
    pub(super) const END: u8 = 0xf0;
    pub(super) const KEY: u8 = 0xf1;
    pub(super) const FIELD: u8 = 0xf2;
    pub(super) const SKIPPED: u8 = 0xf3;
}

/// A list of `f64`s, or of `f32`s, as a whole: their count, then each
/// one's bits (`KeyHasher::literal_value`'s lists); no value starts so.
pub(super) const F64S: u8 = 0x1f;
pub(super) const F32S: u8 = 0x20;

/// Writes a literal's serde calls into a key (the module's rules).
pub(super) struct Literal<'a>(pub(super) &'a mut KeyHasher);

impl Literal<'_> {
    fn tag(&mut self, tag: u8) {
        self.0.buf.push(tag);
        self.0.spill();
    }

    /// A tag and a fixed-width value.
    fn fixed(&mut self, tag: u8, bytes: &[u8]) {
        self.0.buf.push(tag);
        self.0.extend(bytes);
        self.0.spill();
    }

    /// A tag and bytes of any length, after their length.
    fn text(&mut self, tag: u8, bytes: &[u8]) {
        self.0.buf.push(tag);
        self.0
            .buf
            .extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        self.0.extend(bytes);
        self.0.spill();
    }

    /// A variant: its type's name, its index and its name.
    fn variant(&mut self, tag: u8, name: &str, index: u32, variant: &str) {
        self.text(tag, name.as_bytes());
        self.0.buf.extend_from_slice(&index.to_le_bytes());
        self.text(tag, variant.as_bytes());
    }
}

type Done = Result<(), LiteralError>;

/// A compound variant's method: its tag and the variant, then its parts.
macro_rules! variants {
    ($($method:ident = $tag:expr),* $(,)?) => {$(
        fn $method(
            self,
            name: &'static str,
            index: u32,
            variant: &'static str,
            _: usize,
        ) -> Result<Self, LiteralError> {
            self.variant($tag, name, index, variant);
            Ok(self)
        }
    )*};
}

/// An integer method: its width's tag, then its little-endian bytes.
macro_rules! numbers {
    ($($method:ident: $ty:ty = $tag:expr),* $(,)?) => {$(
        fn $method(self, v: $ty) -> Done {
            self.fixed($tag, &v.to_le_bytes());
            Ok(())
        }
    )*};
}

impl<'a, 'h> ser::Serializer for &'a mut Literal<'h> {
    type Ok = ();
    type Error = LiteralError;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn is_human_readable(&self) -> bool {
        false
    }

    fn serialize_bool(self, v: bool) -> Done {
        self.fixed(tag::BOOL, &[u8::from(v)]);
        Ok(())
    }
    numbers! {
        serialize_i8: i8 = tag::I8,
        serialize_i16: i16 = tag::I16,
        serialize_i32: i32 = tag::I32,
        serialize_i64: i64 = tag::I64,
        serialize_i128: i128 = tag::I128,
        serialize_u8: u8 = tag::U8,
        serialize_u16: u16 = tag::U16,
        serialize_u32: u32 = tag::U32,
        serialize_u64: u64 = tag::U64,
        serialize_u128: u128 = tag::U128,
    }
    fn serialize_f32(self, v: f32) -> Done {
        self.fixed(tag::F32, &v.to_bits().to_le_bytes());
        Ok(())
    }
    fn serialize_f64(self, v: f64) -> Done {
        self.fixed(tag::F64, &v.to_bits().to_le_bytes());
        Ok(())
    }
    fn serialize_char(self, v: char) -> Done {
        self.fixed(tag::CHAR, &u32::from(v).to_le_bytes());
        Ok(())
    }
    fn serialize_str(self, v: &str) -> Done {
        self.text(tag::STR, v.as_bytes());
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Done {
        self.text(tag::BYTES, v);
        Ok(())
    }
    fn serialize_none(self) -> Done {
        self.tag(tag::NONE);
        Ok(())
    }
    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> Done {
        self.tag(tag::SOME);
        value.serialize(self)
    }
    fn serialize_unit(self) -> Done {
        self.tag(tag::UNIT);
        Ok(())
    }
    fn serialize_unit_struct(self, name: &'static str) -> Done {
        self.text(tag::UNIT_STRUCT, name.as_bytes());
        Ok(())
    }
    fn serialize_unit_variant(self, name: &'static str, index: u32, variant: &'static str) -> Done {
        self.variant(tag::UNIT_VARIANT, name, index, variant);
        Ok(())
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        name: &'static str,
        value: &T,
    ) -> Done {
        self.text(tag::NEWTYPE_STRUCT, name.as_bytes());
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        value: &T,
    ) -> Done {
        self.variant(tag::NEWTYPE_VARIANT, name, index, variant);
        value.serialize(self)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self, LiteralError> {
        self.tag(tag::SEQ);
        Ok(self)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self, LiteralError> {
        self.tag(tag::TUPLE);
        Ok(self)
    }
    fn serialize_tuple_struct(self, name: &'static str, _: usize) -> Result<Self, LiteralError> {
        self.text(tag::TUPLE_STRUCT, name.as_bytes());
        Ok(self)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self, LiteralError> {
        self.tag(tag::MAP);
        Ok(self)
    }
    fn serialize_struct(self, name: &'static str, _: usize) -> Result<Self, LiteralError> {
        self.text(tag::STRUCT, name.as_bytes());
        Ok(self)
    }
    variants! {
        serialize_tuple_variant = tag::TUPLE_VARIANT,
        serialize_struct_variant = tag::STRUCT_VARIANT,
    }
}

/// The compounds: their parts, then [`tag::END`] (rule 2).
macro_rules! parts {
    ($($trait:ident :: $method:ident),* $(,)?) => {$(
        impl ser::$trait for &mut Literal<'_> {
            type Ok = ();
            type Error = LiteralError;
            fn $method<T: ?Sized + Serialize>(&mut self, value: &T) -> Done {
                value.serialize(&mut **self)
            }
            fn end(self) -> Done {
                self.tag(tag::END);
                Ok(())
            }
        }
    )*};
}

parts!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field,
);

impl ser::SerializeMap for &mut Literal<'_> {
    type Ok = ();
    type Error = LiteralError;
    fn serialize_key<T: ?Sized + Serialize>(&mut self, key: &T) -> Done {
        self.tag(tag::KEY);
        key.serialize(&mut **self)
    }
    fn serialize_value<T: ?Sized + Serialize>(&mut self, value: &T) -> Done {
        value.serialize(&mut **self)
    }
    fn end(self) -> Done {
        self.tag(tag::END);
        Ok(())
    }
}

/// A struct's fields, each by name (rule 3), then [`tag::END`].
macro_rules! fields {
    ($($trait:ident),*) => {$(
        impl ser::$trait for &mut Literal<'_> {
            type Ok = ();
            type Error = LiteralError;
            fn serialize_field<T: ?Sized + Serialize>(
                &mut self,
                name: &'static str,
                value: &T,
            ) -> Done {
                self.text(tag::FIELD, name.as_bytes());
                value.serialize(&mut **self)
            }
            fn skip_field(&mut self, name: &'static str) -> Done {
                self.text(tag::SKIPPED, name.as_bytes());
                Ok(())
            }
            fn end(self) -> Done {
                self.tag(tag::END);
                Ok(())
            }
        }
    )*};
}

fields!(SerializeStruct, SerializeStructVariant);

#[cfg(test)]
mod tests {
    use super::super::{KeyHasher, Tag};
    use rask_executor::Key;
    use serde::Serialize;

    fn key<T: Serialize + ?Sized>(value: &T) -> Key {
        let mut h = KeyHasher::new(Tag::Data, "value", "t");
        h.literal(value).unwrap();
        h.finish()
    }

    /// Rules 1 to 3: widths, boundaries and names tell values apart, where
    /// postcard writes the same bytes (or the same bytes split otherwise).
    #[test]
    fn calls_widths_boundaries_and_names_count() {
        assert_ne!(key(&1u8), key(&1u64));
        assert_ne!(key(&false), key(&0u64));
        assert_ne!(key(&""), key(&Vec::<u8>::new()));
        assert_ne!(key(&None::<u8>), key(&()));
        assert_ne!(key(&vec!["ab", "c"]), key(&vec!["a", "bc"]));
        assert_ne!(key(&vec![vec![1u8], vec![]]), key(&vec![vec![], vec![1u8]]));
        assert_ne!(key(&(vec![1u8], 2u8)), key(&(vec![1u8, 2], ())));
        #[derive(Serialize)]
        struct A {
            a: u8,
        }
        #[derive(Serialize)]
        struct B {
            b: u8,
        }
        assert_ne!(key(&A { a: 1 }), key(&B { b: 1 }));
        assert_eq!(key(&A { a: 1 }), key(&A { a: 1 }));
    }
}
