//! The JSON line format: one object a line with the keys `timestamp`,
//! `level`, `fields` and `target`, written straight into the formatter's
//! buffer (no map is built, no field allocated).

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// One event as a JSON object: `{"timestamp", "level", "fields": {...},
/// "target"}`. Written straight into the formatter's buffer: no map is built
/// and no field is allocated. The `log.*` fields the `log` bridge adds
/// (file paths inside other crates' sources) are left out.
pub struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        writer.write_str("{\"timestamp\":\"")?;
        SystemTime.format_time(&mut writer)?;
        write!(writer, "\",\"level\":\"{}\",\"fields\":{{", meta.level())?;
        let mut fields = JsonFields {
            out: &mut writer,
            first: true,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str("},\"target\":")?;
        json_str(&mut writer, meta.target())?;
        writer.write_str("}\n")
    }
}

/// Writes an event's fields as JSON members.
struct JsonFields<'a, 'w> {
    out: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl JsonFields<'_, '_> {
    /// Writes `"name":` then the value `write` writes, skipping `log.*` fields.
    fn member(&mut self, field: &Field, write: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        let sep = if std::mem::take(&mut self.first) {
            ""
        } else {
            ","
        };
        self.result = self
            .out
            .write_str(sep)
            .and_then(|()| json_str(self.out, field.name()))
            .and_then(|()| self.out.write_char(':'))
            .and_then(|()| write(self.out));
    }
}

impl Visit for JsonFields<'_, '_> {
    // 128-bit integers go through `record_debug`: strings, as `tracing_serde`
    // writes them (no JSON reader keeps them exact as numbers).
    fn record_f64(&mut self, field: &Field, value: f64) {
        // `Debug` prints the shortest form that reads back, with a `.0` or an
        // exponent (`3.0`, `1e-7`): a JSON number, the one `serde_json`
        // writes. JSON has no NaN or infinity.
        if value.is_finite() {
            self.member(field, |w| write!(w, "{value:?}"));
        } else {
            self.member(field, |w| w.write_str("null"));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field, |w| json_str(w, value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.member(field, |w| {
            w.write_char('"')?;
            write!(JsonEscape(w), "{value}")?;
            w.write_char('"')
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.member(field, |w| {
            w.write_char('"')?;
            write!(JsonEscape(w), "{value:?}")?;
            w.write_char('"')
        });
    }
}

/// `s` as a JSON string.
fn json_str(w: &mut Writer<'_>, s: &str) -> fmt::Result {
    w.write_char('"')?;
    JsonEscape(&mut *w).write_str(s)?;
    w.write_char('"')
}

/// Passes text on with JSON string escapes, so `Display` and `Debug` output
/// goes into the line without a copy.
struct JsonEscape<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for JsonEscape<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&s[plain..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::{Level, Log, Record};
    use std::sync::{Arc, Mutex};
    use tracing_log::LogTracer;
    use tracing_subscriber::fmt::MakeWriter;

    /// A writer into a shared buffer, for a subscriber under test.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// One event with every kind of field value, some needing escapes.
    fn emit() {
        let err = std::io::Error::other("disk \"full\"");
        tracing::info!(
            target: "access",
            request_id = %"req-\"1\"",
            text = "tab\there, newline\nthere, bell \u{7}, back\\slash, 你好",
            debug = ?("tuple", 3),
            status = 200u16,
            delta = -5i64,
            big = u128::MAX,
            duration_ms = 12.5,
            whole = 3.0,
            tiny = 1e-7,
            nan = f64::NAN,
            flag = true,
            missing = Option::<u64>::None,
            error = &err as &(dyn std::error::Error + 'static),
            "request {}", "done"
        );
    }

    fn parsed(text: &str) -> serde_json::Value {
        let line = text.lines().next().expect("a line");
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    #[test]
    fn json_lines_read_like_tracing_subscribers_own() {
        let ours = Captured::default();
        let theirs = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(ours.clone())
            .event_format(JsonLine)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_current_span(false)
            .with_writer(theirs.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let (text, mut ours, mut theirs) =
            (ours.text(), parsed(&ours.text()), parsed(&theirs.text()));
        assert!(text.ends_with("}\n") && text.lines().count() == 1, "{text}");
        let stamp = |v: &mut serde_json::Value| v.as_object_mut().unwrap().remove("timestamp");
        let (a, b) = (stamp(&mut ours).unwrap(), stamp(&mut theirs).unwrap());
        assert_eq!(
            a.as_str().unwrap().len(),
            b.as_str().unwrap().len(),
            "{a} {b}"
        );
        assert_eq!(ours, theirs);
        assert_eq!(
            ours["fields"]["text"],
            "tab\there, newline\nthere, bell \u{7}, back\\slash, 你好"
        );
        assert_eq!(ours["fields"]["whole"].as_f64(), Some(3.0));
        assert!(ours["fields"]["nan"].is_null());
        assert!(ours["fields"].get("missing").is_none());
    }

    #[test]
    fn json_lines_leave_out_the_log_bridges_source_paths() {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .event_format(JsonLine)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let record = Record::builder()
                .args(format_args!("Bootstrap done"))
                .level(Level::Warn)
                .target("pingora_core::server")
                .file(Some(
                    "/root/.cargo/registry/src/pingora-core/src/server/mod.rs",
                ))
                .line(Some(7))
                .build();
            LogTracer::new().log(&record);
        });
        let text = out.text();
        let v = parsed(&text);
        assert_eq!(
            v,
            serde_json::json!({
                "timestamp": v["timestamp"],
                "level": "WARN",
                "fields": {"message": "Bootstrap done"},
                "target": "pingora_core::server",
            }),
            "{text}"
        );
    }
}
