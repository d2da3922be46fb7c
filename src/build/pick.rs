//! Parts of a value as tasks of their own: a tuple's element
//! ([`Delayed::split`](crate::Delayed::split)), a list's element or a map's value
//! ([`Delayed::item`](crate::Delayed::item)), on every executor.
//!
//! Rules:
//!
//! 1. Locally a part is a typed task: it moves the part out when it holds
//!    the last reference to the whole, and clones it otherwise.
//! 2. On the wire a part is the built-in function `rask.getitem` (see
//!    `registry.rs`, rule 5) whose payload is a [`Pick`]: the type tag of
//!    the whole (`key::type_tag`), its name for messages, and the [`Step`].
//!    A worker cannot name the whole's type from bytes, so it finds it
//!    among the output types of the functions given to `init`, which every
//!    process registers alike; the client checks this before sending, so
//!    an unknown type is an error in the client, naming the type.
//! 3. A worker takes the part by serializing the whole through a
//!    serializer that keeps only the part's postcard bytes ([`Picker`]):
//!    no type is needed for the part, whose consumers decode it with
//!    their own.

use std::marker::PhantomData;
use std::sync::Arc;

use rask_executor::{Encoded, OpError, Value, WireError, WireTask};
use serde::ser::{self, Impossible, Serialize};
use serde::{Deserialize, Serialize as SerializeDerive};

use crate::build::data::Data;
use crate::build::node::{Call, Code, Function, Inputs};

/// The function name of a part of a value on the wire (rule 2).
pub(crate) const GETITEM_FUNCTION: &str = "rask.getitem";

/// Which part of a value.
#[derive(Debug, Clone, PartialEq, Eq, SerializeDerive, Deserialize)]
pub(crate) enum Step {
    /// A tuple's element.
    Element(u32),
    /// A list's element.
    Index(u64),
    /// A map's value, by the postcard bytes of its key.
    Key(Vec<u8>),
}

/// The payload of `rask.getitem` (rule 2).
#[derive(Debug, SerializeDerive, Deserialize)]
pub(crate) struct Pick {
    pub(crate) tag: u64,
    pub(crate) type_name: String,
    pub(crate) step: Step,
}

impl Pick {
    pub(crate) fn decode(bytes: &[u8]) -> Result<Pick, WireError> {
        postcard::from_bytes(bytes).map_err(|e| WireError::Decode {
            what: "a part of a value".into(),
            reason: e.to_string(),
        })
    }
}

/// Takes a part of a value of a type registered as an output (rule 2).
pub(crate) type Picks = fn(Value, &Step) -> Result<Value, OpError>;

/// The part of a `W` at `step`, as bytes (rule 3).
pub(crate) fn pick<W: Data>(value: Value, step: &Step) -> Result<Value, OpError> {
    let whole = crate::build::data::shared::<W>(value).map_err(OpError::failed)?;
    let mut picker = Picker {
        step,
        found: None,
        seen: 0,
        take_next: false,
    };
    match whole.serialize(&mut picker) {
        Ok(()) => {}
        Err(e) => return Err(OpError::failed(e.0)),
    }
    match picker.found {
        Some(bytes) => Ok(Arc::new(Encoded::new(Arc::from(bytes)))),
        None => Err(missing::<W>(step, picker.seen)),
    }
}

fn missing<W>(step: &Step, seen: usize) -> OpError {
    let whole = std::any::type_name::<W>();
    OpError::failed(match step {
        Step::Element(i) => format!("a `{whole}` has no element {i}"),
        Step::Index(i) => format!("index {i} is out of range for a list of {seen} (`{whole}`)"),
        Step::Key(_) => format!("the key is not in the map (`{whole}`, {seen} entries)"),
    })
}

/// A task taking a part of its one input, typed (rule 1).
pub(crate) struct Part<W, P> {
    pub(crate) step: Step,
    pub(crate) take: fn(W, &Step) -> Result<P, OpError>,
    pub(crate) borrow: fn(&W, &Step) -> Result<P, OpError>,
    pub(crate) _types: PhantomData<fn() -> (W, P)>,
}

impl<W: Data, P: Data> Call for Part<W, P> {
    fn output_type(&self) -> Option<std::any::TypeId> {
        Some(std::any::TypeId::of::<P>())
    }

    fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
        let whole = Inputs::new(inputs).shared::<W>()?;
        // The last user of the whole moves the part out.
        let part = match Arc::try_unwrap(whole) {
            Ok(owned) => (self.take)(owned, &self.step)?,
            Err(shared) => (self.borrow)(&shared, &self.step)?,
        };
        Ok(Arc::new(part))
    }

    fn code(&self) -> Code {
        Code::Call(Function {
            builtin: true,
            ..Function::of::<Self, P>()
        })
    }

    fn to_wire(&self) -> Result<WireTask, WireError> {
        let tag = crate::build::key::type_tag::<W>();
        let type_name = std::any::type_name::<W>();
        if !crate::build::registry::picks_known(tag) {
            return Err(WireError::NotSerializable {
                what: format!(
                    "a part of a `{type_name}`, which is the output of no function given to \
                     rask::init (a worker finds the type through them)"
                ),
            });
        }
        let pick = Pick {
            tag,
            type_name: type_name.to_owned(),
            step: self.step.clone(),
        };
        let payload = postcard::to_stdvec(&pick).map_err(|e| WireError::Encode {
            what: "a part of a value".into(),
            reason: e.to_string(),
        })?;
        Ok(WireTask {
            function: GETITEM_FUNCTION.to_owned(),
            payload,
        })
    }
}

/// A part taken by a worker (rule 2).
pub(crate) struct Picked {
    pub(crate) picks: Picks,
    pub(crate) step: Step,
}

impl Call for Picked {
    fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
        let value = Inputs::new(inputs).next_value()?;
        (self.picks)(value, &self.step)
    }
}

/// Why a [`Picker`] stopped.
#[derive(Debug)]
pub(crate) struct Stop(String);

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Stop {}

impl ser::Error for Stop {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Stop(msg.to_string())
    }
}

/// A serializer that keeps the postcard bytes of one part (rule 3).
pub(crate) struct Picker<'a> {
    step: &'a Step,
    found: Option<Vec<u8>>,
    /// Elements or entries gone by, for messages.
    seen: usize,
    /// The map value to come is the part.
    take_next: bool,
}

impl Picker<'_> {
    fn keep<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Stop> {
        let bytes = postcard::to_stdvec(value).map_err(|e| Stop(e.to_string()))?;
        self.found = Some(bytes);
        Ok(())
    }

    fn wrong(&self, what: &str) -> Stop {
        Stop(match self.step {
            Step::Element(_) => format!("the value is {what}, not a tuple"),
            Step::Index(_) => format!("the value is {what}, not a list"),
            Step::Key(_) => format!("the value is {what}, not a map"),
        })
    }
}

macro_rules! not_a_container {
    ($($method:ident($($t:ty),*) $what:literal;)*) => {$(
        fn $method(self, $(_: $t),*) -> Result<(), Stop> {
            Err(self.wrong($what))
        }
    )*};
}

impl<'a, 'p> ser::Serializer for &'a mut Picker<'p> {
    type Ok = ();
    type Error = Stop;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Impossible<(), Stop>;
    type SerializeMap = Self;
    type SerializeStruct = Impossible<(), Stop>;
    type SerializeStructVariant = Impossible<(), Stop>;

    not_a_container! {
        serialize_bool(bool) "a bool";
        serialize_i8(i8) "a number";
        serialize_i16(i16) "a number";
        serialize_i32(i32) "a number";
        serialize_i64(i64) "a number";
        serialize_i128(i128) "a number";
        serialize_u8(u8) "a number";
        serialize_u16(u16) "a number";
        serialize_u32(u32) "a number";
        serialize_u64(u64) "a number";
        serialize_u128(u128) "a number";
        serialize_f32(f32) "a number";
        serialize_f64(f64) "a number";
        serialize_char(char) "a char";
        serialize_str(&str) "a string";
        serialize_bytes(&[u8]) "bytes";
        serialize_none() "an option";
        serialize_unit() "a unit";
        serialize_unit_struct(&'static str) "a unit struct";
        serialize_unit_variant(&'static str, u32, &'static str) "an enum";
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<(), Stop> {
        Err(self.wrong("an option"))
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Stop> {
        // Postcard encodes a newtype as its content.
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), Stop> {
        Err(self.wrong("an enum"))
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Self, Stop> {
        match self.step {
            Step::Index(_) => Ok(self),
            _ => Err(self.wrong("a list")),
        }
    }

    fn serialize_tuple(self, _: usize) -> Result<Self, Stop> {
        match self.step {
            Step::Element(_) => Ok(self),
            _ => Err(self.wrong("a tuple")),
        }
    }

    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self, Stop> {
        self.serialize_tuple(0)
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Impossible<(), Stop>, Stop> {
        Err(self.wrong("an enum"))
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Self, Stop> {
        match self.step {
            Step::Key(_) => Ok(self),
            _ => Err(self.wrong("a map")),
        }
    }

    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Impossible<(), Stop>, Stop> {
        Err(self.wrong("a struct"))
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Impossible<(), Stop>, Stop> {
        Err(self.wrong("an enum"))
    }
}

impl Picker<'_> {
    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Stop> {
        let wanted = match self.step {
            Step::Element(i) => u64::from(*i),
            Step::Index(i) => *i,
            Step::Key(_) => unreachable!("maps take entries"),
        };
        if self.found.is_none() && self.seen as u64 == wanted {
            self.keep(value)?;
        }
        self.seen += 1;
        Ok(())
    }
}

impl ser::SerializeSeq for &mut Picker<'_> {
    type Ok = ();
    type Error = Stop;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Stop> {
        self.element(value)
    }
    fn end(self) -> Result<(), Stop> {
        Ok(())
    }
}

impl ser::SerializeTuple for &mut Picker<'_> {
    type Ok = ();
    type Error = Stop;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Stop> {
        self.element(value)
    }
    fn end(self) -> Result<(), Stop> {
        Ok(())
    }
}

impl ser::SerializeTupleStruct for &mut Picker<'_> {
    type Ok = ();
    type Error = Stop;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Stop> {
        self.element(value)
    }
    fn end(self) -> Result<(), Stop> {
        Ok(())
    }
}

/// Map entries: the key's bytes are compared with the wanted key's; the
/// value that follows a match is kept.
impl ser::SerializeMap for &mut Picker<'_> {
    type Ok = ();
    type Error = Stop;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Stop> {
        let bytes = postcard::to_stdvec(key).map_err(|e| Stop(e.to_string()))?;
        self.seen += 1;
        self.take_next =
            self.found.is_none() && matches!(self.step, Step::Key(wanted) if *wanted == bytes);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Stop> {
        if std::mem::take(&mut self.take_next) {
            self.keep(value)?;
        }
        Ok(())
    }
    fn end(self) -> Result<(), Stop> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn bytes_of(value: &Value) -> Vec<u8> {
        value
            .downcast_ref::<Encoded>()
            .expect("a part is bytes")
            .0
            .to_vec()
    }

    #[test]
    fn parts_come_from_typed_values_and_from_bytes() {
        let whole = (7_i64, "seven".to_string());
        let typed: Value = Arc::new(whole.clone());
        let fetched: Value = Arc::new(Encoded::new(Arc::from(
            postcard::to_stdvec(&whole).unwrap(),
        )));
        for value in [typed, fetched] {
            let part = pick::<(i64, String)>(value, &Step::Element(1)).unwrap();
            let s: String = postcard::from_bytes(&bytes_of(&part)).unwrap();
            assert_eq!(s, "seven");
        }
        let list: Value = Arc::new(vec![1_u8, 2, 3]);
        let part = pick::<Vec<u8>>(list.clone(), &Step::Index(2)).unwrap();
        assert_eq!(bytes_of(&part), vec![3]);
        let err = pick::<Vec<u8>>(list.clone(), &Step::Index(3)).unwrap_err();
        assert!(
            err.message.contains("out of range for a list of 3"),
            "{}",
            err.message
        );
        let err = pick::<Vec<u8>>(list, &Step::Element(0)).unwrap_err();
        assert!(err.message.contains("not a tuple"), "{}", err.message);
        let map: Value = Arc::new(BTreeMap::from([
            ("a".to_string(), 1_u32),
            ("b".to_string(), 2),
        ]));
        let key = postcard::to_stdvec("b").unwrap();
        let part = pick::<BTreeMap<String, u32>>(map.clone(), &Step::Key(key)).unwrap();
        assert_eq!(postcard::from_bytes::<u32>(&bytes_of(&part)).unwrap(), 2);
        let key = postcard::to_stdvec("z").unwrap();
        assert!(pick::<BTreeMap<String, u32>>(map, &Step::Key(key)).is_err());
    }
}
