//! Run-time backend selection: `--device cpu|wgpu[:N]|cuda[:N]`.
//!
//! Model code is generic over `B: Backend`; this module is the one place that names concrete
//! backends. Cargo features only make a backend *available*; the device string picks one.

use std::str::FromStr;

use crate::error::{CoreError, Result};

/// A device named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// burn's Flex CPU backend (pure Rust, SIMD, multi-threaded).
    #[default]
    Cpu,
    /// wgpu (Vulkan / Metal / DX12); `None` picks the default adapter, `Some(i)` the i-th discrete GPU.
    Wgpu(Option<usize>),
    /// CUDA device `i`.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        let (kind, index) = match s.split_once(':') {
            Some((k, i)) => {
                let i = i.parse::<usize>().map_err(|_| {
                    CoreError::setting(
                        "device",
                        format!("{s:?}: the index after ':' must be a number (e.g. cuda:0)"),
                    )
                })?;
                (k, Some(i))
            }
            None => (s, None),
        };
        match (kind, index) {
            ("cpu", None) => Ok(Self::Cpu),
            ("wgpu", i) => Ok(Self::Wgpu(i)),
            ("cuda", i) => Ok(Self::Cuda(i.unwrap_or(0))),
            _ => Err(CoreError::setting(
                "device",
                format!("{s:?}: expected cpu, wgpu, wgpu:N, cuda or cuda:N"),
            )),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Wgpu(None) => write!(f, "wgpu"),
            Self::Wgpu(Some(i)) => write!(f, "wgpu:{i}"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The wgpu backend we run: burn's `CubeBackend` on the wgpu runtime *without* kernel fusion.
///
/// `burn::backend::Wgpu` wraps it in `Fusion`, which in burn 0.21 miscompiles the SwiGLU block
/// at a single position (one row: cached decoding, or a 1-token input): the MLP output was off
/// by 0.27 and the logits by 2.5–3.4 on Mesa lavapipe, while every op on its own and the same
/// graph with two rows matched the CPU (`tests/it/parity.rs`, the wgpu tests). Without fusion
/// the wgpu parity tests pass.
#[cfg(feature = "wgpu")]
pub type WgpuBackend =
    burn::backend::wgpu::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;

/// The CUDA backend we run: burn's `CubeBackend` on the CUDA runtime without kernel fusion
/// (`burn::backend::Cuda` wraps it in `Fusion`). Our operations' kernels (`crate::ops`) are
/// recognised on this type; under `Fusion` every operation would run composed, keeping the
/// O(seq²) attention probabilities for backward. The same choice as [`WgpuBackend`], where
/// fusion also miscomputed SwiGLU in burn 0.21.
#[cfg(feature = "cuda")]
pub type CudaBackend =
    burn_cubecl::CubeBackend<burn_cubecl::cubecl::cuda::CudaRuntime, f32, i32, u8>;

/// Work to run on whichever backend the user picked (inference).
pub trait OnBackend {
    /// What the work returns.
    type Output;
    /// Run on backend `B`.
    fn run<B: burn::tensor::backend::Backend>(self, device: B::Device) -> Self::Output;
}

/// Work that needs gradients (training).
pub trait OnAutodiffBackend {
    /// What the work returns.
    type Output;
    /// Run on backend `B`.
    fn run<B: burn::tensor::backend::AutodiffBackend>(self, device: B::Device) -> Self::Output;
}

fn not_built(feature: &str) -> CoreError {
    CoreError::Invalid(format!(
        "this llama-pro was built without the `{feature}` feature; rebuild with `cargo build --release --features {feature}`"
    ))
}

/// Run `task` on the backend named by `spec`, after checking that the device starts (see
/// [`probe`]).
pub fn dispatch<T: OnBackend>(spec: DeviceSpec, task: T) -> Result<T::Output> {
    match spec {
        #[cfg(feature = "cpu")]
        DeviceSpec::Cpu => Ok(task.run::<burn::backend::Flex>(Default::default())),
        #[cfg(feature = "wgpu")]
        DeviceSpec::Wgpu(i) => {
            let device = wgpu_device(i)?;
            probe::<WgpuBackend>(spec, &device)?;
            Ok(task.run::<WgpuBackend>(device))
        }
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => {
            let device = burn::backend::cuda::CudaDevice::new(i);
            probe::<CudaBackend>(spec, &device)?;
            Ok(task.run::<CudaBackend>(device))
        }
        #[allow(unreachable_patterns)]
        other => Err(not_built(feature_of(other))),
    }
}

/// Check that the device named by `spec` is available and starts, before anything is written:
/// the backend is built in, a wgpu adapter exists (the error lists what was found), and a small
/// computation runs (a backend that panics while starting, e.g. CUDA without a driver, becomes an
/// error naming the device).
pub fn check_device(spec: DeviceSpec) -> Result<()> {
    struct Nothing;
    impl OnBackend for Nothing {
        type Output = ();
        fn run<B: burn::tensor::backend::Backend>(self, _: B::Device) {}
    }
    dispatch(spec, Nothing)
}

/// Run a one-element computation on `device`, turning a panic inside the backend into an error.
#[allow(dead_code)]
fn probe<B: burn::tensor::backend::Backend>(spec: DeviceSpec, device: &B::Device) -> Result<()> {
    let device = device.clone();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        burn::tensor::Tensor::<B, 1>::ones([1], &device)
            .sum()
            .into_data()
            .to_vec::<f32>()
            .ok()
    }));
    std::panic::set_hook(hook);
    match r {
        Ok(Some(v)) if v == [1.0] => Ok(()),
        Ok(_) => Err(CoreError::setting(
            "device",
            format!("\"{spec}\": a test computation gave a wrong result"),
        )),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the backend panicked".into());
            Err(CoreError::setting(
                "device",
                format!("\"{spec}\" could not start: {msg}"),
            ))
        }
    }
}

/// Run `task` on the autodiff version of the backend named by `spec`.
pub fn dispatch_autodiff<T: OnAutodiffBackend>(spec: DeviceSpec, task: T) -> Result<T::Output> {
    dispatch_autodiff_with(spec, false, task)
}

/// [`dispatch_autodiff`] with a choice of activation checkpointing: with `checkpointing`, burn's
/// `BalancedCheckpointing` strategy keeps the outputs of compute-bound ops (matmuls) for the
/// backward pass and recomputes the memory-bound ones (norms, activations, elementwise products,
/// RoPE) from them, trading some compute for activation memory. The gradients are the same.
pub fn dispatch_autodiff_with<T: OnAutodiffBackend>(
    spec: DeviceSpec,
    checkpointing: bool,
    task: T,
) -> Result<T::Output> {
    struct One<T>(T);
    impl<T: OnAutodiffBackend> OnAutodiffDevices for One<T> {
        type Output = T::Output;
        fn run<B: burn::tensor::backend::AutodiffBackend>(
            self,
            mut devices: Vec<B::Device>,
        ) -> Self::Output {
            self.0.run::<B>(devices.remove(0))
        }
    }
    dispatch_autodiff_devices(&[spec], checkpointing, One(task))
}

/// A task on several devices of one autodiff backend (data-parallel training).
pub trait OnAutodiffDevices {
    /// What the task returns.
    type Output;
    /// Run on `devices` (one per `DeviceSpec` given, in order) of backend `B`.
    fn run<B: burn::tensor::backend::AutodiffBackend>(
        self,
        devices: Vec<B::Device>,
    ) -> Self::Output;
}

/// [`dispatch_autodiff_with`] for several devices of one kind (`cpu,cpu`, `cuda:0,cuda:1`):
/// each is checked to start, then `task` runs with all of them. Devices of different kinds
/// are refused (one backend type per run).
pub fn dispatch_autodiff_devices<T: OnAutodiffDevices>(
    specs: &[DeviceSpec],
    checkpointing: bool,
    task: T,
) -> Result<T::Output> {
    use burn::backend::Autodiff;
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing as Ck;
    let Some(&first) = specs.first() else {
        return Err(CoreError::setting("devices", "no device given"));
    };
    let kind = std::mem::discriminant(&first);
    if let Some(other) = specs.iter().find(|s| std::mem::discriminant(*s) != kind) {
        return Err(CoreError::setting(
            "devices",
            format!("{first} and {other}: the devices of a run must be of one kind"),
        ));
    }
    match (first, checkpointing) {
        #[cfg(feature = "cpu")]
        (DeviceSpec::Cpu, false) => {
            Ok(task.run::<Autodiff<burn::backend::Flex>>(vec![Default::default(); specs.len()]))
        }
        #[cfg(feature = "cpu")]
        (DeviceSpec::Cpu, true) => Ok(
            task.run::<Autodiff<burn::backend::Flex, Ck>>(vec![Default::default(); specs.len()])
        ),
        #[cfg(feature = "wgpu")]
        (DeviceSpec::Wgpu(_), ck) => {
            let mut devices = Vec::new();
            for &spec in specs {
                let DeviceSpec::Wgpu(i) = spec else {
                    unreachable!("checked above")
                };
                let device = wgpu_device(i)?;
                probe::<WgpuBackend>(spec, &device)?;
                devices.push(device);
            }
            Ok(match ck {
                false => task.run::<Autodiff<WgpuBackend>>(devices),
                true => task.run::<Autodiff<WgpuBackend, Ck>>(devices),
            })
        }
        #[cfg(feature = "cuda")]
        (DeviceSpec::Cuda(_), ck) => {
            let mut devices = Vec::new();
            for &spec in specs {
                let DeviceSpec::Cuda(i) = spec else {
                    unreachable!("checked above")
                };
                let device = burn::backend::cuda::CudaDevice::new(i);
                probe::<CudaBackend>(spec, &device)?;
                devices.push(device);
            }
            Ok(match ck {
                false => task.run::<Autodiff<CudaBackend>>(devices),
                true => task.run::<Autodiff<CudaBackend, Ck>>(devices),
            })
        }
        #[allow(unreachable_patterns)]
        (other, _) => Err(not_built(feature_of(other))),
    }
}

#[allow(dead_code)]
fn feature_of(spec: DeviceSpec) -> &'static str {
    match spec {
        DeviceSpec::Cpu => "cpu",
        DeviceSpec::Wgpu(_) => "wgpu",
        DeviceSpec::Cuda(_) => "cuda",
    }
}

/// The wgpu device for `wgpu` / `wgpu:N`: the N-th adapter (default the first) of the best kind
/// present, in the order discrete GPU, integrated GPU, virtual GPU, CPU (Mesa's lavapipe), other,
/// on the graphics API burn's wgpu runtime uses (Vulkan; Metal on macOS). With no adapter, or
/// fewer than N + 1, an error lists what was found.
#[cfg(feature = "wgpu")]
pub fn wgpu_device(i: Option<usize>) -> Result<burn::backend::wgpu::WgpuDevice> {
    use burn::backend::wgpu::WgpuDevice;
    use wgpu::DeviceType as T;
    let api = if cfg!(target_os = "macos") {
        wgpu::Backend::Metal
    } else {
        wgpu::Backend::Vulkan
    };
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: api.into(),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let adapters: Vec<wgpu::AdapterInfo> = block_on(instance.enumerate_adapters(api.into()))
        .iter()
        .map(|a| a.get_info())
        .collect();
    let found = || {
        adapters
            .iter()
            .enumerate()
            .map(|(k, a)| format!("{k}: {} ({:?}, {:?})", a.name, a.device_type, a.backend))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let n = i.unwrap_or(0);
    let spec = DeviceSpec::Wgpu(i);
    let order = [
        T::DiscreteGpu,
        T::IntegratedGpu,
        T::VirtualGpu,
        T::Cpu,
        T::Other,
    ];
    let Some(kind) = order
        .into_iter()
        .find(|k| adapters.iter().any(|a| a.device_type == *k))
    else {
        return Err(CoreError::setting(
            "device",
            format!(
                "\"{spec}\": no {api:?} adapter found (no GPU driver, and no software one). On Linux, \
                 Mesa's lavapipe gives a CPU adapter: apt-get install mesa-vulkan-drivers"
            ),
        ));
    };
    let of_kind = adapters.iter().filter(|a| a.device_type == kind).count();
    if n >= of_kind {
        return Err(CoreError::setting(
            "device",
            format!(
                "\"{spec}\": there is no adapter {n} of the best kind present ({kind:?}: {of_kind}); found {}",
                found()
            ),
        ));
    }
    Ok(match kind {
        T::DiscreteGpu => WgpuDevice::DiscreteGpu(n),
        T::IntegratedGpu => WgpuDevice::IntegratedGpu(n),
        T::VirtualGpu => WgpuDevice::VirtualGpu(n),
        T::Cpu => WgpuDevice::Cpu,
        // cubecl takes "other" adapters when none of the asked kind exists.
        T::Other => WgpuDevice::DiscreteGpu(n),
    })
}

/// Poll a future that completes without waiting on I/O (wgpu's native adapter enumeration).
#[cfg(feature = "wgpu")]
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

/// Make glibc's allocator keep freed memory for reuse instead of handing it back to the kernel.
///
/// A training step allocates and frees hundreds of activation and gradient buffers of a few
/// MiB each. glibc serves blocks above its mmap threshold (128 KiB at start) with fresh
/// `mmap`s and trims the heap top after frees, so every step pays page faults and zeroing for
/// memory it just released: 10% of a CPU step on the S benchmark. This raises the mmap
/// threshold to 32 MiB (glibc's maximum) and the trim threshold to 1 GiB. Peak memory is
/// unchanged; memory is returned at exit. The `llama-pro` binary and `llama_pro_train::train`
/// call it; programs that embed the model can call it once at start. A no-op on other
/// platforms and C libraries.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is thread-safe in glibc.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// [`verify_identity_dirs`](crate::expand::verify_identity_dirs) on the backend named by `spec`:
/// the largest |Δlogits| between a base model directory and its expansion (0 = bitwise equal).
pub fn verify_identity_on(
    spec: DeviceSpec,
    base: &std::path::Path,
    expanded: &std::path::Path,
) -> Result<f32> {
    struct Task<'a>(&'a std::path::Path, &'a std::path::Path);
    impl OnBackend for Task<'_> {
        type Output = Result<f32>;
        fn run<B: burn::tensor::backend::Backend>(self, device: B::Device) -> Result<f32> {
            crate::expand::verify_identity_dirs::<B>(self.0, self.1, &device)
        }
    }
    dispatch(spec, Task(base, expanded))?
}
