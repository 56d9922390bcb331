//! `--otel`: an OpenTelemetry pipeline as a service would run one — the `tracing` layer at level
//! `INFO`, the SDK's batch processor — whose exporter drops the spans after counting them, so
//! that what is measured is the cost on the emitting and listening side, not an exporter's
//! network.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::layer::SubscriberExt;

/// Counts the spans it is handed, and drops them.
#[derive(Debug, Clone, Default)]
struct Dropping(Arc<AtomicU64>);

impl SpanExporter for Dropping {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        self.0.fetch_add(batch.len() as u64, Ordering::Relaxed);
        std::future::ready(Ok(()))
    }
}

/// The installed pipeline; [`Pipeline::finish`] flushes it and reports the spans exported.
pub struct Pipeline {
    provider: SdkTracerProvider,
    exported: Arc<AtomicU64>,
}

/// Installs the pipeline as the global `tracing` subscriber. `lean`: without the layer's
/// default extras per span (busy and idle times, code location, thread).
pub fn install(lean: bool) -> Pipeline {
    let exporter = Dropping::default();
    let exported = exporter.0.clone();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("txbus-bench"));
    let layer = if lean {
        layer
            .with_tracked_inactivity(false)
            .with_location(false)
            .with_threads(false)
    } else {
        layer
    };
    let subscriber = tracing_subscriber::registry()
        .with(layer)
        .with(tracing_subscriber::filter::LevelFilter::INFO);
    tracing::subscriber::set_global_default(subscriber).unwrap();
    Pipeline { provider, exported }
}

impl Pipeline {
    /// Flushes what is buffered and prints how many spans were exported.
    pub fn finish(self) {
        let _ = self.provider.force_flush();
        eprintln!(
            "OpenTelemetry: {} spans exported (trace context stored: {})",
            self.exported.load(Ordering::Relaxed),
            cfg!(feature = "opentelemetry")
        );
        let _ = self.provider.shutdown();
    }
}
