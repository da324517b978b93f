use tracing_core::{Level, LevelFilter};
use tracing_subscriber::{
    Layer, filter::filter_fn, layer::SubscriberExt, registry, util::SubscriberInitExt,
};

/// Utilities to help handle communication termination.
pub async fn os_shutdown_signal() {
    // llama-pro patch: the servers (orchestrator, tensor data service) live as long as the
    // process. Upstream stopped them on Ctrl-C / SIGTERM, which also replaced nothing but raced
    // with llama-pro's own handling of those signals: finish the step, agree across the nodes to
    // stop (an all-reduce, through these servers), write the checkpoint, exit.
    std::future::pending::<()>().await
}

pub(crate) fn init_logging() {
    let layer = tracing_subscriber::fmt::layer()
        .with_filter(LevelFilter::INFO)
        .with_filter(filter_fn(|m| {
            if let Some(path) = m.module_path() {
                // The wgpu crate is logging too much, so we skip `info` level.
                if path.starts_with("wgpu") && *m.level() >= Level::INFO {
                    return false;
                }
            }
            true
        }));

    // If we start multiple servers in the same process, this will fail, it's ok
    let _ = registry().with(layer).try_init();
}
