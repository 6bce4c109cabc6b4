//! An imhost node running in this process, like mini-redis's `start_server`.

use imhost::config::Options;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use crate::api::{API_KEY, Api};

/// A running node; dropping it stops the node. Derefs to its [`Api`].
pub struct TestHost {
    pub api: Api,
    stop: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestHost {
    /// Starts a node with test defaults overridden by `options`, and waits
    /// until it serves and its plugins have settled.
    pub async fn start(options: Options) -> TestHost {
        let host = Self::start_serving(options).await;
        host.api.wait_plugins_settled().await;
        host
    }

    /// [`TestHost::start`] without waiting for plugins: returns as soon as
    /// the node answers `/healthz`.
    pub async fn start_serving(options: Options) -> TestHost {
        let listener = imhost::server::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let defaults = Options {
            listen: Some(addr),
            api_key: Some(API_KEY.into()),
            plugin_cache: Some(crate::plugin_cache()),
            plugin_grants: Some(crate::test_grants()),
            // Tests share one cache: keep what every test uses.
            plugin_cache_keep: Some(256),
            ..Options::default()
        };
        let config = options.or(defaults).resolve().expect("test config");
        let stop = CancellationToken::new();
        let signal = stop.clone().cancelled_owned();
        let task = tokio::spawn(imhost::server::run(listener, config, signal));
        let host = TestHost {
            api: Api::new(addr),
            stop,
            task: Some(task),
        };
        host.api.wait_serving().await;
        host
    }

    /// A node with every default.
    pub async fn default() -> TestHost {
        Self::start(Options::default()).await
    }

    /// Begins a graceful shutdown and returns what `server::run` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        let task = self.task.take().expect("running");
        tokio::time::timeout(crate::DEADLINE, task)
            .await
            .expect("node stopped in time")
            .expect("node task")
    }
}

impl std::ops::Deref for TestHost {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
