//! Log lines of every process: text (the default) or JSON lines (`XPYD_LOG_FORMAT=json`),
//! each carrying who wrote it — the process's role (`coordinator`, `supervisor`,
//! `prefill`, `decode`, `combined`, `cli`) and, for a worker, its id — so the lines of
//! every process under `xpyd up`, which share one stderr, are told apart. Colour only
//! when stderr is a terminal. The few lines written outside `tracing` (the supervisor's
//! notices) go through [`say`], in the same format.

use std::io::{IsTerminal, Write};
use std::sync::RwLock;
pub use tracing::Level;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// How lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human lines, prefixed with `[worker id or role]`.
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            o => Err(format!(
                "{}: `{o}` is not a log format (text, json)",
                crate::env::LOG_FORMAT
            )),
        }
    }
}

/// Who writes the lines of this process.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    role: String,
    worker_id: Option<String>,
}

static IDENTITY: RwLock<Option<Identity>> = RwLock::new(None);
static FORMAT: RwLock<LogFormat> = RwLock::new(LogFormat::Text);

/// Sets who writes this process's lines (a worker's flip sets its new role and id).
pub fn set_identity(role: &str, worker_id: Option<&str>) {
    *IDENTITY.write().unwrap_or_else(|e| e.into_inner()) = Some(Identity {
        role: role.into(),
        worker_id: worker_id.map(String::from),
    });
}

fn identity() -> Identity {
    IDENTITY
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or(Identity {
            role: "cli".into(),
            worker_id: None,
        })
}

/// The format `XPYD_LOG_FORMAT` asks for.
///
/// # Errors
/// An unknown format, naming the variable.
pub fn format_from_env() -> Result<LogFormat, String> {
    std::env::var(crate::env::LOG_FORMAT)
        .unwrap_or_default()
        .parse()
}

/// Installs the process's subscriber: `filter` decides what is written, `format` how.
pub fn init(filter: tracing_subscriber::EnvFilter, format: LogFormat) {
    *FORMAT.write().unwrap_or_else(|e| e.into_inner()) = format;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.with_ansi(false).event_format(JsonLines).init(),
        LogFormat::Text => b
            .with_ansi(std::io::stderr().is_terminal())
            .event_format(Tagged(Format::default()))
            .init(),
    }
}

/// Writes one line outside `tracing` (a notice for the operator) in the process's
/// format: as is in text, as a JSON line with `level` and the identity in JSON.
pub fn say(level: Level, message: &str) {
    let line = match *FORMAT.read().unwrap_or_else(|e| e.into_inner()) {
        LogFormat::Text => message.to_string(),
        LogFormat::Json => {
            let mut o = base(level, "xpyd");
            o.insert("message".into(), message.into());
            serde_json::Value::Object(o).to_string()
        }
    };
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The fields every JSON line starts with.
fn base(level: Level, target: &str) -> serde_json::Map<String, serde_json::Value> {
    let who = identity();
    let ts = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut o = serde_json::Map::new();
    o.insert("ts".into(), ts.into());
    o.insert("level".into(), level.as_str().into());
    o.insert("role".into(), who.role.into());
    o.insert("worker_id".into(), who.worker_id.into());
    o.insert("target".into(), target.into());
    o
}

/// JSON lines: `ts`, `level`, `role`, `worker_id`, `target`, `message`, the event's
/// fields, and the names of the spans it happened in.
struct JsonLines;

#[derive(Default)]
struct Fields(serde_json::Map<String, serde_json::Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut o = base(*meta.level(), meta.target());
        let mut fields = Fields::default();
        event.record(&mut fields);
        for (k, v) in fields.0 {
            // The identity is the process's: an event's own field of the same name
            // (`worker_id` of a worker the coordinator talks about) keeps its value
            // under `event.<name>`.
            let k = if o.contains_key(&k) && k != "message" {
                format!("event.{k}")
            } else {
                k
            };
            o.insert(k, v);
        }
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<serde_json::Value> =
                scope.from_root().map(|s| s.name().into()).collect();
            o.insert("spans".into(), spans.into());
        }
        writeln!(writer, "{}", serde_json::Value::Object(o))
    }
}

/// Text lines with the writer's tag in front: `[decode-1] 2026-… WARN …`.
struct Tagged(Format<Full>);

impl<S, N> FormatEvent<S, N> for Tagged
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let who = identity();
        write!(
            writer,
            "[{}] ",
            who.worker_id.as_deref().unwrap_or(&who.role)
        )?;
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_unknown_ones_name_the_variable() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("".parse::<LogFormat>(), Ok(LogFormat::Text));
        let e = "yaml".parse::<LogFormat>().unwrap_err();
        assert!(
            e.contains(crate::env::LOG_FORMAT) && e.contains("yaml"),
            "{e}"
        );
    }

    #[derive(Clone, Default)]
    struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn an_event_becomes_one_json_line_with_its_fields_and_the_writer() {
        set_identity("prefill", Some("prefill-2"));
        let buf = Buf::default();
        let out = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("request", id = 7);
            let _g = span.enter();
            tracing::warn!(
                worker_id = "decode-1",
                bytes = 42u64,
                ok = true,
                "kv \"sent\"\nlate"
            );
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["message"], "kv \"sent\"\nlate");
        assert_eq!(
            (v["role"].as_str(), v["worker_id"].as_str()),
            (Some("prefill"), Some("prefill-2"))
        );
        assert_eq!(
            v["event.worker_id"], "decode-1",
            "the event's own field is kept"
        );
        assert_eq!(
            (v["bytes"].as_u64(), v["ok"].as_bool()),
            (Some(42), Some(true))
        );
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["spans"], serde_json::json!(["request"]));
    }

    #[test]
    fn a_json_line_carries_who_wrote_it() {
        // The same identity as the other test of this process's global one.
        set_identity("prefill", Some("prefill-2"));
        let o = base(Level::WARN, "t");
        assert_eq!(o["role"], "prefill");
        assert_eq!(o["worker_id"], "prefill-2");
        assert_eq!(o["level"], "WARN");
        assert!(
            time::OffsetDateTime::parse(
                o["ts"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339
            )
            .is_ok()
        );
    }
}
