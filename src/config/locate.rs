//! Where a key sits in the config text. The validated values carry no
//! positions, so an error's line is found by walking the YAML once more, down
//! a key path such as `upstreams / second / connect_timeout`, with the same
//! parser that read the file: repeated key names in other sections, flow
//! style and comments cannot mislead it.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// One step of a key path: a mapping key or a sequence index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

impl<'a> From<&'a str> for Seg<'a> {
    fn from(key: &'a str) -> Self {
        Seg::Key(key)
    }
}

impl<'a> From<&'a String> for Seg<'a> {
    fn from(key: &'a String) -> Self {
        Seg::Key(key)
    }
}

impl From<usize> for Seg<'_> {
    fn from(index: usize) -> Self {
        Seg::Index(index)
    }
}

/// A key path from its steps: `at!["upstreams", name, "endpoints", 1]`.
macro_rules! at {
    ($($seg:expr),* $(,)?) => {
        vec![$($crate::config::locate::Seg::from($seg)),*]
    };
}
pub(crate) use at;

/// The 1-based line of the deepest part of `path` that `text` holds: the
/// key's own line, or its section's when the key is not written (a default).
pub(crate) fn line_of(text: &str, path: &[Seg<'_>]) -> Option<usize> {
    (1..=path.len())
        .rev()
        .find_map(|len| exact_line(text, &path[..len]))
}

/// The line of exactly `path`, if the text has it.
fn exact_line(text: &str, path: &[Seg<'_>]) -> Option<usize> {
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    match (Find { path }).deserialize(deserializer) {
        // The search stops with a marker error where the path ends; the
        // parser stamps it with the position of the node it was reading
        // (and prefixes the message with the path so far).
        Err(e) if e.to_string().contains(FOUND) => e.location().map(|l| l.line()),
        _ => None,
    }
}

const FOUND: &str = "chatgate: key found";

/// Walks one node, descending along `path`; fails with [`FOUND`] at its end.
struct Find<'p, 'a> {
    path: &'p [Seg<'a>],
}

impl<'de> DeserializeSeed<'de> for Find<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.path.is_empty() {
            return d.deserialize_any(Here);
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Find<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (Seg::Key(wanted), rest) = (self.path[0], &self.path[1..]) else {
            return ignore_map(map);
        };
        while let Some(matched) = map.next_key_seed(KeyIs {
            wanted,
            last: rest.is_empty(),
        })? {
            if matched {
                map.next_value_seed(Find { path: rest })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let (Seg::Index(wanted), rest) = (self.path[0], &self.path[1..]) else {
            return ignore_seq(seq);
        };
        let mut i = 0;
        while (if i == wanted {
            seq.next_element_seed(Find { path: rest })?
        } else {
            seq.next_element::<IgnoredAny>()?.map(drop)
        })
        .is_some()
        {
            i += 1;
        }
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.deserialize(d)
    }
}

/// Fails with [`FOUND`] on whatever node it reads, so the parser marks it.
struct Here;

impl<'de> Visitor<'de> for Here {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(FOUND))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(FOUND))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }
}

fn ignore_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

fn ignore_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Reads a mapping key: whether it is `wanted`; when it is and the path ends
/// here, fails with [`FOUND`] so the error carries the key's own position.
struct KeyIs<'a> {
    wanted: &'a str,
    last: bool,
}

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        match (key == self.wanted, self.last) {
            (true, true) => Err(E::custom(FOUND)),
            (matched, _) => Ok(matched),
        }
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<bool, A::Error> {
        ignore_map(map).map(|()| false)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<bool, A::Error> {
        ignore_seq(seq).map(|()| false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
upstreams:
  first:
    connect_timeout: 1s
    endpoints: [\"a:1\", \"b:2\"]
  second:
    # connect_timeout: 3s
    endpoints:
      - c:3
      - {address: \"d:4\", weight: 2}
    connect_timeout: 0s
routes:
  - path: /a
    upstream: first
  - upstream: second
    path: /b
";

    fn line(path: Vec<Seg<'_>>) -> Option<usize> {
        line_of(TEXT, &path)
    }

    #[test]
    fn repeated_keys_are_found_under_their_own_parent() {
        assert_eq!(line(at!["upstreams", "first", "connect_timeout"]), Some(3));
        assert_eq!(
            line(at!["upstreams", "second", "connect_timeout"]),
            Some(10)
        );
        assert_eq!(line(at!["routes", 0, "upstream"]), Some(13));
        assert_eq!(line(at!["routes", 1, "upstream"]), Some(14));
        assert_eq!(line(at!["routes", 1, "path"]), Some(15));
    }

    #[test]
    fn sequence_entries_in_block_and_flow_style() {
        assert_eq!(line(at!["upstreams", "first", "endpoints", 1]), Some(4));
        assert_eq!(line(at!["upstreams", "second", "endpoints", 0]), Some(8));
        assert_eq!(line(at!["upstreams", "second", "endpoints", 1]), Some(9));
        assert_eq!(line(at!["routes", 1]), Some(14));
    }

    #[test]
    fn an_unwritten_key_falls_back_to_its_section() {
        assert_eq!(line(at!["upstreams", "first", "retries"]), Some(2));
        assert_eq!(line(at!["routes", 5, "path"]), Some(11));
        assert_eq!(line(at!["limits", "max_connections"]), None);
        assert_eq!(line(at![]), None);
    }
}
