//! JSON arrays (streamed element by element) and JSONL, each record handed
//! to a format's converter with the line or element that names it.

use std::io::{BufRead, Read};

use lvpipe_schemas::QuarantineReason;
use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde_json::Value;

use super::{Body, Emit, ReadLimits, Reject};
use crate::{Error, Result};

pub(super) type Convert<'a> = dyn Fn(Value) -> Body + 'a;

/// A JSON array (streamed element by element) or JSONL, as VILA's loader
/// accepts both: the first non-blank byte decides.
pub(super) fn read_json_records<R: BufRead>(
    mut reader: R,
    origin: &str,
    limits: ReadLimits,
    emit: &mut Emit,
    convert: &Convert,
) -> Result<()> {
    let first = loop {
        let buf = reader.fill_buf()?;
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => break Some(buf[i]),
            None if buf.is_empty() => break None,
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    };
    if first == Some(b'[') {
        read_json_array(reader, origin, emit, convert)
    } else {
        read_jsonl(reader, origin, limits, emit, convert)
    }
}

/// One record per line; a line longer than `limits.record_bytes` is
/// quarantined without being held in memory whole.
pub(super) fn read_jsonl<R: BufRead>(
    mut reader: R,
    origin: &str,
    limits: ReadLimits,
    emit: &mut Emit,
    convert: &Convert,
) -> Result<()> {
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        let max = limits.record_bytes;
        if (&mut reader).take(max + 1).read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        number += 1;
        if line.len() as u64 > max && line.last() != Some(&b'\n') {
            let rest = skip_line(&mut reader)?;
            let detail = format!(
                "the line has {} bytes, more than {max} (--max-record-bytes)",
                line.len() as u64 + rest
            );
            let reject = Reject::new(QuarantineReason::RecordTooLarge, detail);
            emit(format!("{origin}:{number}"), Err(reject))?;
            continue;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let here = format!("{origin}:{number}");
        let body = match std::str::from_utf8(&line) {
            Err(e) => Err(Reject::new(
                QuarantineReason::NonUtf8,
                format!("invalid UTF-8 at byte {} of the line", e.valid_up_to()),
            )),
            Ok(text) => match serde_json::from_str::<Value>(text) {
                Err(e) => Err(Reject::new(
                    QuarantineReason::MalformedJson,
                    format!("column {}: {e}", e.column()),
                )),
                Ok(value) => convert(value),
            },
        };
        emit(here, body)?;
    }
}

/// Reads past the end of the current line; returns the bytes skipped.
fn skip_line<R: BufRead>(reader: &mut R) -> Result<u64> {
    let mut skipped = 0u64;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(skipped);
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return Ok(skipped + i as u64 + 1);
            }
            None => {
                let n = buf.len();
                skipped += n as u64;
                reader.consume(n);
            }
        }
    }
}

/// Streams the elements of a top-level JSON array without holding the array.
/// A syntax error ends the array: the elements before it are kept and the
/// rest becomes one quarantine row that says where parsing stopped.
fn read_json_array<R: Read>(
    reader: R,
    origin: &str,
    emit: &mut Emit,
    convert: &Convert,
) -> Result<()> {
    struct Elements<'a, 'b> {
        origin: &'a str,
        emit: &'a mut Emit<'b>,
        convert: &'a Convert<'a>,
        index: &'a mut u64,
        stop: &'a mut Option<Error>,
    }
    impl<'de> Visitor<'de> for Elements<'_, '_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON array of annotations")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
            while let Some(value) = seq.next_element::<Value>()? {
                let body = (self.convert)(value);
                if let Err(e) = (self.emit)(format!("{}[{}]", self.origin, self.index), body) {
                    *self.stop = Some(e);
                    return Err(serde::de::Error::custom("stopped"));
                }
                *self.index += 1;
            }
            Ok(())
        }
    }
    impl<'de> DeserializeSeed<'de> for Elements<'_, '_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(
            self,
            d: D,
        ) -> std::result::Result<(), D::Error> {
            d.deserialize_seq(self)
        }
    }
    let mut index = 0u64;
    let mut stop = None;
    let mut de = serde_json::Deserializer::from_reader(reader);
    let seed = Elements {
        origin,
        emit,
        convert,
        index: &mut index,
        stop: &mut stop,
    };
    let parsed = seed.deserialize(&mut de).and_then(|()| de.end());
    if let Some(e) = stop {
        return Err(e);
    }
    if let Err(e) = parsed {
        let reason = if e.to_string().contains("UTF-8") {
            QuarantineReason::NonUtf8
        } else {
            QuarantineReason::MalformedJson
        };
        let detail = format!(
            "line {} column {}: {e}; the elements after index {index} are not read",
            e.line(),
            e.column()
        );
        emit(
            format!("{origin}[{index}]"),
            Err(Reject::new(reason, detail)),
        )?;
    }
    Ok(())
}
