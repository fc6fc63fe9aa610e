//! OpenTelemetry traces: one server span per public request, one client span per
//! upstream attempt (GenAI conventions), W3C trace context in and out, exported
//! over OTLP/HTTP (plain, or TLS verified with rustls) by a background thread fed
//! through a bounded queue.
//!
//! Why not the SDK's `BatchSpanProcessor`: it drops spans silently; this queue
//! counts every span it cannot deliver (`chatgate_trace_spans_dropped_total`). The
//! request path only ever does a `try_send`: a collector that is down, slow or
//! refusing fills the queue and costs spans, never latency.
//!
//! Spans carry ids, routes, models, token counts and outcomes; never prompts,
//! answers, user names, tokens, passwords or keys.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, Span as SdkSpan, SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use tokio::sync::mpsc;

use crate::chat::FinishSeen;
use crate::config::TracingSettings;
use crate::metrics;

/// Finished spans waiting for the exporter; past this they are dropped (and counted).
const QUEUE_SPANS: usize = 4096;
/// Most spans in one OTLP request.
const BATCH_SPANS: usize = 512;
/// How long the exporter waits to fill a batch.
const BATCH_WINDOW: Duration = Duration::from_millis(500);
/// One OTLP request's time limit (a collector that accepts and never answers).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

static TRACER: OnceLock<SdkTracer> = OnceLock::new();
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether spans are recorded (`tracing:` is configured and [`init`] ran).
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// Starts the exporter thread and the tracer. Call once at start-up.
pub fn init(settings: &TracingSettings) -> Result<(), String> {
    let resource = Resource::builder()
        .with_service_name(settings.service_name.clone())
        .build();
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(settings.traces_url.clone())
        .with_timeout(EXPORT_TIMEOUT);
    if !settings.headers.is_empty() {
        let headers = settings.headers.iter();
        builder = builder.with_headers(
            headers
                .map(|(n, v)| (n.to_string(), v.expose_str()))
                .collect(),
        );
    }
    if settings.traces_url.starts_with("https://") {
        builder = builder.with_http_client(https_client(settings.ca_file.as_deref())?);
    }
    let mut exporter = builder.build().map_err(|e| {
        format!(
            "tracing: cannot build the OTLP exporter for {}: {e}",
            crate::redact::redact_url(&settings.traces_url)
        )
    })?;
    exporter.set_resource(&resource);
    let (tx, rx) = mpsc::channel(QUEUE_SPANS);
    std::thread::Builder::new()
        .name("chatgate-otlp".into())
        .spawn(move || export_loop(exporter, rx))
        .map_err(|e| format!("tracing: cannot start the exporter thread: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.sample_ratio,
        ))))
        .with_span_processor(QueueProcessor { tx })
        .build();
    let tracer = provider.tracer("chatgate");
    let _ = PROVIDER.set(provider);
    let _ = TRACER.set(tracer);
    tracing::info!(
        endpoint = %crate::redact::redact_url(&settings.traces_url),
        ca_file = settings.ca_file.as_ref().map(|p| p.display().to_string()),
        sample_ratio = settings.sample_ratio,
        headers = ?settings.headers.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>(),
        "traces exported over OTLP/HTTP"
    );
    Ok(())
}

/// The OTLP client of an https collector: rustls, verifying its certificate against
/// `ca_file` or the system's CAs (never unverified), over HTTP/1.1.
fn https_client(
    ca_file: Option<&std::path::Path>,
) -> Result<impl opentelemetry_http::HttpClient + 'static, String> {
    let tls = crate::tls::client_config(ca_file).map_err(|e| format!("tracing: {e}"))?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Ok(opentelemetry_http::hyper::HyperClient::new(
        connector,
        EXPORT_TIMEOUT,
        None,
    ))
}

/// Hands finished spans to the exporter thread without ever waiting.
#[derive(Debug)]
struct QueueProcessor {
    tx: mpsc::Sender<SpanData>,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut SdkSpan, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            metrics::trace_spans_dropped("queue_full", 1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The exporter thread: its own runtime, so a slow collector never holds a request's.
fn export_loop(exporter: opentelemetry_otlp::SpanExporter, mut rx: mpsc::Receiver<SpanData>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "tracing: no exporter runtime; spans are dropped");
            return;
        }
    };
    runtime.block_on(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            let window = tokio::time::Instant::now() + BATCH_WINDOW;
            while batch.len() < BATCH_SPANS {
                match tokio::time::timeout_at(window, rx.recv()).await {
                    Ok(Some(span)) => batch.push(span),
                    _ => break,
                }
            }
            let n = batch.len() as u64;
            if let Err(e) = exporter.export(batch).await {
                metrics::trace_spans_dropped("export_failed", n);
                tracing::debug!(error = %e, spans = n, "OTLP export failed");
            }
        }
    });
}

/// Reads W3C trace context from request headers.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Collects the `traceparent` (and `tracestate`) to send upstream.
#[derive(Default)]
struct Collected(Vec<(&'static str, String)>);

impl Injector for Collected {
    fn set(&mut self, key: &str, value: String) {
        let key = match key {
            "traceparent" => "traceparent",
            "tracestate" => "tracestate",
            _ => return,
        };
        self.0.push((key, value));
    }
}

/// One request's trace: its server span (when tracing is on) or only the client's
/// incoming trace context (passed on upstream unchanged when tracing is off).
pub struct RequestTrace {
    cx: Context,
    recording: bool,
    /// The client span of the attempt that answered, ended when the request is logged.
    attempt: Option<AnsweredSpan>,
    /// The model and finish reasons the answer named.
    reply: FinishSeen,
}

/// The trace of a request with these headers: `None` when tracing is off and the
/// client sent no valid `traceparent` (no allocation on that path).
pub fn start_request(headers: &http::HeaderMap, method: &str) -> Option<Box<RequestTrace>> {
    let tracer = TRACER.get();
    if tracer.is_none() && !headers.contains_key("traceparent") {
        return None;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let Some(tracer) = tracer else {
        return parent.span().span_context().is_valid().then(|| {
            Box::new(RequestTrace {
                cx: parent,
                recording: false,
                attempt: None,
                reply: FinishSeen::default(),
            })
        });
    };
    let span = tracer
        .span_builder(method.to_string())
        .with_kind(SpanKind::Server)
        .with_attributes([KeyValue::new("http.request.method", method.to_string())])
        .start_with_context(tracer, &parent);
    Some(Box::new(RequestTrace {
        cx: parent.with_span(span),
        recording: true,
        attempt: None,
        reply: FinishSeen::default(),
    }))
}

/// What a finished request reports on its server span.
pub struct RequestEnd<'a> {
    pub route: &'a str,
    pub method: &'a str,
    pub status: u16,
    pub request_id: &'a str,
    pub user_id: Option<u64>,
    pub outcome: &'a str,
    pub tokens: Option<(u64, u64)>,
    pub tokens_estimated: bool,
}

impl RequestTrace {
    /// Whether spans are recorded for this request (tracing on and the trace sampled):
    /// what a stream checks before keeping anything for them.
    pub fn is_recording(&self) -> bool {
        self.recording
    }

    /// Notes the model and finish reasons a stream reported.
    pub fn stream_seen(&mut self, seen: FinishSeen) {
        self.reply = seen;
    }

    /// Notes the model and finish reasons of a complete JSON reply (the answer is not kept).
    pub fn reply_seen(&mut self, body: &[u8]) {
        if !self.recording {
            return;
        }
        #[derive(serde::Deserialize)]
        struct Choice {
            finish_reason: Option<String>,
        }
        #[derive(serde::Deserialize)]
        struct Reply {
            model: Option<String>,
            #[serde(default)]
            choices: Vec<Choice>,
        }
        if let Ok(reply) = serde_json::from_slice::<Reply>(body) {
            self.reply = FinishSeen {
                model: reply.model,
                finish_reasons: reply
                    .choices
                    .into_iter()
                    .filter_map(|c| c.finish_reason)
                    .collect(),
            };
        }
    }

    /// Keeps the answering attempt's span open until the request ends.
    pub fn attempt_answered(&mut self, span: Option<AnsweredSpan>) {
        self.attempt = span;
    }

    /// A stream's first piece of answer text reached the gateway: the attempt's event
    /// `gen_ai.first_token`. Call once per stream.
    pub fn first_token(&self) {
        let Some(attempt) = &self.attempt else { return };
        attempt.cx.span().add_event(
            "gen_ai.first_token",
            vec![KeyValue::new(
                "gen_ai.server.time_to_first_token",
                attempt.started.elapsed().as_secs_f64(),
            )],
        );
    }

    /// Ends the attempt's span (with the usage) and the server span.
    pub fn end(mut self, end: RequestEnd<'_>) {
        if !self.recording {
            return;
        }
        if let Some(attempt) = self.attempt.take() {
            let span = attempt.cx.span();
            if let Some((input, output)) = end.tokens {
                span.set_attribute(KeyValue::new("gen_ai.usage.input_tokens", input as i64));
                span.set_attribute(KeyValue::new("gen_ai.usage.output_tokens", output as i64));
                if end.tokens_estimated {
                    span.set_attribute(KeyValue::new("chatgate.tokens_estimated", true));
                }
            }
            let reply = std::mem::take(&mut self.reply);
            if let Some(model) = reply.model {
                span.set_attribute(KeyValue::new("gen_ai.response.model", model));
            }
            if !reply.finish_reasons.is_empty() {
                let reasons = reply
                    .finish_reasons
                    .into_iter()
                    .map(Into::into)
                    .collect::<Vec<opentelemetry::StringValue>>();
                span.set_attribute(KeyValue::new(
                    "gen_ai.response.finish_reasons",
                    opentelemetry::Value::Array(reasons.into()),
                ));
            }
            if end.outcome != "ok" {
                span.set_attribute(KeyValue::new("chatgate.outcome", end.outcome.to_string()));
            }
            span.end();
        }
        let span = self.cx.span();
        span.update_name(format!("{} {}", end.method, end.route));
        let mut attributes = vec![
            KeyValue::new("http.route", end.route.to_string()),
            KeyValue::new("http.response.status_code", i64::from(end.status)),
            KeyValue::new("chatgate.request_id", end.request_id.to_string()),
            KeyValue::new("chatgate.outcome", end.outcome.to_string()),
        ];
        if let Some(user) = end.user_id {
            attributes.push(KeyValue::new("enduser.id", user.to_string()));
        }
        span.set_attributes(attributes);
        if end.status >= 500 {
            span.set_status(Status::error(end.outcome.to_string()));
        }
        span.end();
    }
}

/// What an upstream call is part of: the request's id and trace.
#[derive(Clone, Copy)]
pub struct CallTrace<'a> {
    pub request_id: &'a str,
    pub trace: Option<&'a RequestTrace>,
    /// The model the request asks for (`gen_ai.request.model`).
    pub model: &'a str,
}

/// The client span of the attempt that answered, open until the request ends.
pub struct AnsweredSpan {
    cx: Context,
    started: Instant,
}

/// One upstream attempt's client span (when tracing is on) and the headers it sends.
pub struct AttemptSpan {
    cx: Option<Context>,
    started: Instant,
    /// `traceparent`/`tracestate` for the upstream request.
    pub headers: Vec<(&'static str, String)>,
}

impl AttemptSpan {
    /// Starts attempt `n` against `address:port`.
    pub fn start(call: &CallTrace<'_>, address: &str, port: u16, n: u32) -> AttemptSpan {
        let started = Instant::now();
        let Some(trace) = call.trace else {
            return AttemptSpan {
                cx: None,
                started,
                headers: Vec::new(),
            };
        };
        let mut headers = Collected::default();
        let propagator = TraceContextPropagator::new();
        let cx = match TRACER.get().filter(|_| trace.recording) {
            Some(tracer) => {
                let mut attributes = vec![
                    KeyValue::new("gen_ai.operation.name", "chat"),
                    KeyValue::new("server.address", address.to_string()),
                    KeyValue::new("server.port", i64::from(port)),
                    KeyValue::new("chatgate.attempt", i64::from(n)),
                ];
                // An openai route without a forced model sends the client's choice.
                let name = if call.model.is_empty() {
                    "chat".to_string()
                } else {
                    attributes.push(KeyValue::new(
                        "gen_ai.request.model",
                        call.model.to_string(),
                    ));
                    format!("chat {}", call.model)
                };
                let span = tracer
                    .span_builder(name)
                    .with_kind(SpanKind::Client)
                    .with_start_time(SystemTime::now())
                    .with_attributes(attributes)
                    .start_with_context(tracer, &trace.cx);
                let cx = trace.cx.with_span(span);
                propagator.inject_context(&cx, &mut headers);
                Some(cx)
            }
            None => {
                propagator.inject_context(&trace.cx, &mut headers);
                None
            }
        };
        AttemptSpan {
            cx,
            started,
            headers: headers.0,
        }
    }

    /// The span context sent upstream (for tests and logs).
    pub fn span_context(&self) -> Option<SpanContext> {
        self.cx.as_ref().map(|cx| cx.span().span_context().clone())
    }

    /// A failed attempt: error status and type, then the span ends.
    pub fn failed(self, error_type: &str, status: Option<u16>) {
        let Some(cx) = self.cx else { return };
        let span = cx.span();
        span.set_attribute(KeyValue::new("error.type", error_type.to_string()));
        if let Some(status) = status {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        span.set_status(Status::error(error_type.to_string()));
        span.end();
    }

    /// The response header arrived: notes the time to first byte and keeps the span open.
    /// `stream`: the first token comes later (see [`RequestTrace::first_token`]); for a
    /// whole reply, the header's time is also the first token's.
    pub fn answered(
        self,
        first_byte_at: Instant,
        status: u16,
        stream: bool,
    ) -> Option<AnsweredSpan> {
        let cx = self.cx?;
        let span = cx.span();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        let seconds = first_byte_at
            .saturating_duration_since(self.started)
            .as_secs_f64();
        let mut attributes = vec![KeyValue::new("chatgate.time_to_first_byte", seconds)];
        if !stream {
            attributes.push(KeyValue::new("gen_ai.server.time_to_first_token", seconds));
        }
        span.add_event("gen_ai.first_byte", attributes);
        Some(AnsweredSpan {
            cx,
            started: self.started,
        })
    }
}
