//! Data parallelism: the one place that talks to burn's collective operations
//! (`burn-collective`, feature `collective`).
//!
//! A run has `world` workers, one per device, numbered by global rank; a node (one process) holds
//! `local` of them, ranks `node_rank * local ..`. Each worker holds a replica of the model, trains
//! on its own slice of every global batch, and after each backward pass the trainable gradients
//! (with the loss and the stop flag) are summed across workers by [`Collective::sum`]: every
//! worker then clips and applies the same update. On one node burn-collective's local server
//! reduces between the worker threads; on several nodes its global orchestrator (started by node
//! 0 at `--master`) and a peer-to-peer tensor service on each node do.
//!
//! Kept behind this module because burn's later versions replace `burn-collective` with an
//! all-reduce operation of the backend: only this file should have to change.
//!
//! Failures: a collective call waits at most `timeout` for the other workers (a worker that died
//! in another process never answers), and in one process a worker that fails marks the run failed
//! ([`Collective::fail`]) so that the others' waits end at once with an error naming it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use llama_pro_core::burn;

use crate::error::{Result, TrainError};

/// Where the workers of a run are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Workers in this process (one per device).
    pub local: usize,
    /// Processes (machines) taking part; each runs `local` workers.
    pub nodes: usize,
    /// This process's index among them (0 starts the orchestrator and writes the outputs).
    pub node_rank: usize,
    /// The orchestrator's `HOST:PORT` (several nodes only).
    pub master: Option<String>,
    /// `HOST:PORT` where this node serves tensors to the others (several nodes; default: the
    /// address this machine reaches the master from, port master's + 1 + node rank).
    pub node_address: Option<String>,
    /// How long a collective call waits for the other workers.
    pub timeout: Duration,
}

impl Topology {
    /// One worker on one device: no collective at all.
    pub fn single() -> Self {
        Self {
            local: 1,
            nodes: 1,
            node_rank: 0,
            master: None,
            node_address: None,
            timeout: Duration::from_secs(600),
        }
    }

    /// Workers of the whole run.
    pub fn world(&self) -> usize {
        self.local * self.nodes
    }

    /// Global rank of this process's `i`-th worker.
    pub fn rank(&self, i: usize) -> usize {
        self.node_rank * self.local + i
    }
}

/// State shared by the workers of one process: the first failure.
#[derive(Default)]
pub struct Shared {
    failed: AtomicBool,
    first: std::sync::Mutex<Option<(usize, String)>>,
}

impl Shared {
    /// Record that worker `rank` failed with `error` (the first failure is the one reported) and
    /// end the other local workers' waits.
    pub fn fail(&self, rank: usize, error: &str) {
        if let Ok(mut g) = self.first.lock()
            && g.is_none()
        {
            *g = Some((rank, error.to_string()));
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    /// The first failure recorded: the worker's rank and its error.
    pub fn first_failure(&self) -> Option<(usize, String)> {
        self.first.lock().map(|g| g.clone()).unwrap_or(None)
    }
}

/// One worker's handle on the collective: its rank, the run's size, what it shares with the
/// other workers of its process.
pub struct Collective {
    rank: usize,
    world: usize,
    timeout: Duration,
    shared: Arc<Shared>,
    /// Set once registered (then `finish` should be called).
    #[cfg_attr(not(feature = "collective"), allow(dead_code))]
    registered: bool,
}

impl Collective {
    /// The collective of a run on one device: every operation is the identity.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world: 1,
            timeout: Duration::from_secs(600),
            shared: Arc::default(),
            registered: false,
        }
    }

    /// This worker's global rank (0 writes checkpoints, metrics and the exported model).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Workers of the run.
    pub fn world(&self) -> usize {
        self.world
    }
}

/// Join the collective as the worker of global rank `rank` of `topology`, on `device` (the
/// inner, non-autodiff backend: gradients live there). Waits until every worker of the run has
/// joined (or the timeout passes).
pub fn join<B: Backend>(
    topology: &Topology,
    rank: usize,
    device: &B::Device,
    shared: Arc<Shared>,
) -> Result<Collective> {
    let mut c = Collective {
        rank,
        world: topology.world(),
        timeout: topology.timeout,
        shared,
        registered: false,
    };
    if c.world == 1 {
        return Ok(c);
    }
    imp::register::<B>(&c, topology, device)?;
    c.registered = true;
    Ok(c)
}

impl Collective {
    /// Element-wise sum of `t` over all workers (every worker gets the sum). With one worker, `t`.
    /// `what`: what is summed, for the error.
    pub fn sum<B: Backend>(&self, what: &str, t: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        if self.world == 1 {
            return Ok(t);
        }
        imp::all_reduce_sum(self, what, t)
    }

    /// [`Collective::sum`] of a few numbers of the host, summed on `device`.
    pub fn sum_values<B: Backend>(
        &self,
        what: &str,
        values: Vec<f32>,
        device: &B::Device,
    ) -> Result<Vec<f32>> {
        let n = values.len();
        let t = Tensor::<B, 1>::from_data(burn::tensor::TensorData::new(values, [n]), device);
        self.sum(what, t)?
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| TrainError::Invalid(format!("reading {what}: {e:?}")))
    }

    /// Leave the collective after the last operation of a run. Best effort: the run's results
    /// are complete by then (another node may already have left and taken the orchestrator
    /// with it), so this waits a few seconds at most and reports nothing.
    pub fn finish<B: Backend>(mut self) {
        #[cfg(feature = "collective")]
        if self.registered {
            self.timeout = self.timeout.min(Duration::from_secs(5));
            let _ = imp::finish::<B>(&self);
        }
    }

    /// Wait for `rx` like a collective call: the timeout, and the other local workers' failure.
    #[cfg_attr(not(feature = "collective"), allow(dead_code))]
    fn wait<T>(&self, what: &str, rx: std::sync::mpsc::Receiver<T>) -> Result<T> {
        let start = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(v) => return Ok(v),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(self.peer_error(what, "the collective service stopped"));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
            if self.shared.failed.load(Ordering::SeqCst) {
                return Err(self.peer_error(what, "another worker failed"));
            }
            if start.elapsed() >= self.timeout {
                return Err(self.peer_error(
                    what,
                    &format!(
                        "no answer from the other workers for {} s (a worker died, hangs or \
                         cannot be reached; --collective-timeout sets the wait)",
                        self.timeout.as_secs()
                    ),
                ));
            }
        }
    }

    fn peer_error(&self, what: &str, why: &str) -> TrainError {
        TrainError::Collective(format!(
            "worker {} of {}: {what}: {why}",
            self.rank, self.world
        ))
    }
}

#[cfg(feature = "collective")]
mod imp {
    use super::*;
    use burn::tensor::TensorPrimitive;
    use burn_collective::{
        CollectiveConfig, PeerId, ReduceOperation, all_reduce, finish_collective, reset_collective,
    };
    use std::sync::Mutex;

    /// burn-collective's local server is one per backend type and process: runs in one process
    /// take turns (tests run in parallel threads).
    static TURN: Mutex<()> = Mutex::new(());

    pub(super) fn register<B: Backend>(
        c: &Collective,
        t: &Topology,
        device: &B::Device,
    ) -> Result<()> {
        let mut config = CollectiveConfig::default().with_num_devices(t.local);
        if t.nodes > 1 {
            let master = t.master.as_deref().ok_or_else(|| {
                TrainError::setting("master", "several nodes need --master HOST:PORT")
            })?;
            let (host, port) = split_host_port(master, "master")?;
            quiet_logs();
            if t.node_rank == 0 && c.rank == 0 {
                start_orchestrator(port)?;
            }
            let node = match &t.node_address {
                Some(a) => a.clone(),
                None => format!(
                    "{}:{}",
                    local_ip_towards(&host, port),
                    port as usize + 1 + t.node_rank
                ),
            };
            let (node_host, node_port) = split_host_port(&node, "node_address")?;
            let addr = |h: &str, p: u16| format!("ws://{h}:{p}").parse().expect("infallible");
            config = config
                .with_num_nodes(t.nodes as u32)
                .with_global_address(addr(&host, port))
                .with_node_address(addr(&node_host, node_port))
                .with_data_service_port(node_port);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (peer, device) = (PeerId(c.rank as u32), device.clone());
        std::thread::spawn(move || {
            let _ = tx.send(burn_collective::register::<B>(peer, device, config));
        });
        c.wait("joining the other workers", rx)?
            .map_err(|e| c.peer_error("joining the other workers", &describe(&e)))
    }

    pub(super) fn all_reduce_sum<B: Backend>(
        c: &Collective,
        what: &str,
        t: Tensor<B, 1>,
    ) -> Result<Tensor<B, 1>> {
        // The ring strategy between nodes cuts the vector in one slice per node and fails on
        // fewer elements than nodes (without telling the other nodes, which then wait): pad.
        let n = t.dims()[0];
        let t = if n < c.world {
            let device = t.device();
            Tensor::cat(vec![t, Tensor::zeros([c.world - n], &device)], 0)
        } else {
            t
        };
        let prim = t.into_primitive().tensor();
        let (tx, rx) = std::sync::mpsc::channel();
        let peer = PeerId(c.rank as u32);
        // burn-collective's calls block without a deadline: the call runs on its own thread and
        // this one waits with one (`Collective::wait`).
        std::thread::spawn(move || {
            let _ = tx.send(all_reduce::<B>(peer, prim, ReduceOperation::Sum));
        });
        let what = format!("summing {what}");
        let out = c
            .wait(&what, rx)?
            .map_err(|e| c.peer_error(&what, &describe(&e)))?;
        Ok(Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(out)).slice(0..n))
    }

    pub(super) fn finish<B: Backend>(c: &Collective) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        let peer = PeerId(c.rank as u32);
        std::thread::spawn(move || {
            let _ = tx.send(finish_collective::<B>(peer));
        });
        c.wait("leaving the collective", rx)?
            .map_err(|e| c.peer_error("leaving the collective", &describe(&e)))
    }

    /// Run `f` with this process's turn at the collective; afterwards (also after a failure)
    /// the local server is reset, which ends the calls of workers still waiting.
    pub(super) fn with_turn<B: Backend, T>(f: impl FnOnce() -> T) -> T {
        let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
        reset::<B>();
        let out = f();
        reset::<B>();
        out
    }

    /// `reset_collective`, which panics when the local server's task has died (burn-collective
    /// panics inside it when a peer node's connection drops): then there is nothing to reset.
    fn reset<B: Backend>() {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let _ = std::panic::catch_unwind(reset_collective::<B>);
        std::panic::set_hook(hook);
    }

    /// burn-collective's error, in words.
    pub(super) fn describe(e: &burn_collective::CollectiveError) -> String {
        use burn_collective::CollectiveError as E;
        match e {
            E::LocalServerMissing => "the collective service stopped: a connection to another \
                node was lost (it died or cannot be reached)"
                .into(),
            E::RegisterParamsMismatch => "the workers were started with different settings \
                (--devices, --nodes, --master)"
                .into(),
            E::AllReduceShapeMismatch => "the workers sent different sizes (different models or \
                settings)"
                .into(),
            other => format!("{other:?}"),
        }
    }

    /// Start burn-collective's global orchestrator on `port` (all interfaces) in the background.
    fn start_orchestrator(port: u16) -> Result<()> {
        // Fail early and clearly when the port is taken (the orchestrator would only log it).
        std::net::TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
            TrainError::setting(
                "master",
                format!("cannot listen on port {port} for the other nodes: {e}"),
            )
        })?;
        std::thread::Builder::new()
            .name("llama-pro-orchestrator".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                rt.block_on(burn_collective::start_global_orchestrator(port));
            })
            .map_err(|e| TrainError::Invalid(format!("starting the orchestrator: {e}")))?;
        Ok(())
    }

    /// burn-communication logs every tensor transfer at INFO level through a global tracing
    /// subscriber it installs unless one exists: install ours first, at WARN (`RUST_LOG`
    /// overrides it).
    fn quiet_logs() {
        use tracing_subscriber::{EnvFilter, fmt};
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
        let _ = fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }

    /// The address of this machine's interface that routes to `host` (no packet is sent).
    fn local_ip_towards(host: &str, port: u16) -> String {
        let ip = std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| {
                s.connect((host, port))?;
                s.local_addr()
            })
            .map(|a| a.ip().to_string());
        ip.unwrap_or_else(|_| "127.0.0.1".into())
    }
}

#[cfg(not(feature = "collective"))]
mod imp {
    use super::*;

    fn not_built() -> TrainError {
        TrainError::setting(
            "devices",
            "this llama-pro was built without the `collective` feature (several workers); \
             rebuild with `--features collective`",
        )
    }

    pub(super) fn register<B: Backend>(_: &Collective, _: &Topology, _: &B::Device) -> Result<()> {
        Err(not_built())
    }

    pub(super) fn all_reduce_sum<B: Backend>(
        _: &Collective,
        _: &str,
        _: Tensor<B, 1>,
    ) -> Result<Tensor<B, 1>> {
        Err(not_built())
    }

    pub(super) fn with_turn<B: Backend, T>(f: impl FnOnce() -> T) -> T {
        f()
    }
}

/// Run `f` (the workers of one process) with this process's turn at the collective, the local
/// collective state reset before and after (see the module docs).
pub fn with_turn<B: Backend, T>(f: impl FnOnce() -> T) -> T {
    imp::with_turn::<B, T>(f)
}

/// `HOST:PORT` → (host, port), with an error naming `key`.
pub fn split_host_port(s: &str, key: &str) -> Result<(String, u16)> {
    let bad = || {
        TrainError::setting(
            key.to_string(),
            format!("{s:?}: expected HOST:PORT (e.g. 10.0.0.1:29500)"),
        )
    };
    let (h, p) = s.rsplit_once(':').ok_or_else(bad)?;
    let p: u16 = p.parse().map_err(|_| bad())?;
    let h = h.trim_start_matches('[').trim_end_matches(']');
    if h.is_empty() || p == 0 {
        return Err(bad());
    }
    Ok((h.to_string(), p))
}
