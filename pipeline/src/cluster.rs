//! SQL on an Apache DataFusion Ballista cluster (the `cluster` feature):
//! the client session `sql --cluster` and `mix --cluster` plan with, and
//! the scheduler and executor processes `lvpipe cluster` starts.
//!
//! A query's plan goes to the scheduler, which cuts it into stages and
//! hands their tasks to the executors; the executors read the shards
//! themselves, so every machine of the cluster must reach the shard folder:
//! a shared filesystem path, or object storage, which the scheduler and the
//! executors open from their own environment (`AWS_*`, ...), as lvpipe's
//! commands do ([`EnvStores`]).

use std::net::SocketAddr;
use std::sync::Arc;

use ballista::prelude::SessionContextExt;
use ballista_core::extension::{
    SessionConfigExt, ballista_aggregate_functions, ballista_scalar_functions,
    ballista_window_functions,
};
use ballista_core::registry::BallistaFunctionRegistry;
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::start_server;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::context::{SessionConfig, SessionContext, SessionState};
use datafusion::execution::object_store::{DefaultObjectStoreRegistry, ObjectStoreRegistry};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use lvpipe_sharding::storage::Remote;
use object_store::ObjectStore;
use url::Url;

use crate::{Error, Result};

/// Object stores for `s3://`, `gs://` and `az://` URLs, made from the
/// environment the first time a bucket is read (DataFusion's registry
/// holds only those registered up front, and a plan that reaches a
/// scheduler or an executor registers nothing there).
#[derive(Debug, Default)]
pub struct EnvStores {
    known: DefaultObjectStoreRegistry,
}

impl ObjectStoreRegistry for EnvStores {
    fn register_store(
        &self,
        url: &Url,
        store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        self.known.register_store(url, store)
    }

    fn deregister_store(&self, url: &Url) -> datafusion::error::Result<Arc<dyn ObjectStore>> {
        self.known.deregister_store(url)
    }

    fn get_store(&self, url: &Url) -> datafusion::error::Result<Arc<dyn ObjectStore>> {
        if let Ok(store) = self.known.get_store(url) {
            return Ok(store);
        }
        let root = format!("{}://{}/", url.scheme(), url.authority());
        let remote = Remote::open(&root)
            .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
        self.known.register_store(url, remote.store());
        Ok(remote.store())
    }
}

/// A runtime whose object stores come from the environment.
fn runtime() -> datafusion::error::Result<Arc<RuntimeEnv>> {
    RuntimeEnvBuilder::new()
        .with_object_store_registry(Arc::new(EnvStores::default()))
        .build_arc()
}

/// The session state a scheduler plans with: Ballista's functions, object
/// stores from the environment.
fn scheduler_state(config: SessionConfig) -> datafusion::error::Result<SessionState> {
    Ok(SessionStateBuilder::new()
        .with_runtime_env(runtime()?)
        .with_config(config)
        .with_default_features()
        .with_scalar_functions(ballista_scalar_functions())
        .with_aggregate_functions(ballista_aggregate_functions())
        .with_window_functions(ballista_window_functions())
        .build())
}

/// A client session whose queries run on the cluster at `url`
/// (`df://HOST:PORT`).
pub(crate) async fn session(url: &str) -> Result<SessionContext> {
    if !url.starts_with("df://") {
        return Err(Error::Usage(format!(
            "--cluster {url}: expected df://HOST:PORT (a Ballista scheduler)"
        )));
    }
    let state = SessionStateBuilder::new()
        .with_runtime_env(runtime()?)
        .with_config(SessionConfig::new_with_ballista())
        .with_default_features()
        .build();
    Ok(SessionContext::remote_with_state(url, state).await?)
}

/// Runs a Ballista scheduler on `bind` until the process is stopped.
pub async fn run_scheduler(bind: SocketAddr) -> Result<()> {
    let config = SchedulerConfig::default()
        .with_hostname(bind.ip().to_string())
        .with_port(bind.port())
        .with_override_session_builder(Arc::new(scheduler_state));
    let cluster = BallistaCluster::new_from_config(&config)
        .await
        .map_err(cluster_error)?;
    start_server(cluster, bind, Arc::new(config))
        .await
        .map_err(cluster_error)
}

/// Where an executor listens and which scheduler it serves.
#[derive(Debug, Clone)]
pub struct ExecutorSettings {
    pub scheduler: SocketAddr,
    /// Host the executor binds and advertises.
    pub host: String,
    /// Arrow Flight port (shuffle data) and gRPC port (tasks).
    pub flight_port: u16,
    pub grpc_port: u16,
    /// Tasks run at once.
    pub tasks: usize,
    /// Folder for shuffle files.
    pub work_dir: Option<String>,
}

/// Runs a Ballista executor until the process is stopped.
pub async fn run_executor(settings: ExecutorSettings) -> Result<()> {
    let config = ExecutorProcessConfig {
        bind_host: settings.host.clone(),
        external_host: Some(settings.host),
        port: settings.flight_port,
        grpc_port: settings.grpc_port,
        scheduler_host: settings.scheduler.ip().to_string(),
        scheduler_port: settings.scheduler.port(),
        vcores: settings.tasks.max(1),
        work_dir: settings.work_dir,
        override_runtime_producer: Some(Arc::new(|_: &SessionConfig| runtime())),
        override_function_registry: Some(Arc::new(functions())),
        ..Default::default()
    };
    start_executor_process(Arc::new(config))
        .await
        .map_err(cluster_error)
}

/// Ballista's default functions and DataFusion's functions on lists and
/// structs (`messages[1]['content']`, `array_length(input_ids)`), which
/// lvpipe's queries use and Ballista's executors do not register.
fn functions() -> BallistaFunctionRegistry {
    let mut registry = BallistaFunctionRegistry::default();
    for f in datafusion::functions_nested::all_default_nested_functions() {
        registry.scalar_functions.insert(f.name().to_string(), f);
    }
    registry
}

fn cluster_error(e: ballista_core::error::BallistaError) -> Error {
    Error::Usage(format!("ballista: {e}"))
}
