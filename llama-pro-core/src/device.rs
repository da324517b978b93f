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

/// Run `task` on the backend named by `spec`.
pub fn dispatch<T: OnBackend>(spec: DeviceSpec, task: T) -> Result<T::Output> {
    match spec {
        #[cfg(feature = "cpu")]
        DeviceSpec::Cpu => Ok(task.run::<burn::backend::Flex>(Default::default())),
        #[cfg(feature = "wgpu")]
        DeviceSpec::Wgpu(i) => Ok(task.run::<WgpuBackend>(wgpu_device(i))),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => {
            Ok(task.run::<burn::backend::Cuda>(burn::backend::cuda::CudaDevice::new(i)))
        }
        #[allow(unreachable_patterns)]
        other => Err(not_built(feature_of(other))),
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
    use burn::backend::Autodiff;
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing as Ck;
    match (spec, checkpointing) {
        #[cfg(feature = "cpu")]
        (DeviceSpec::Cpu, false) => {
            Ok(task.run::<Autodiff<burn::backend::Flex>>(Default::default()))
        }
        #[cfg(feature = "cpu")]
        (DeviceSpec::Cpu, true) => {
            Ok(task.run::<Autodiff<burn::backend::Flex, Ck>>(Default::default()))
        }
        #[cfg(feature = "wgpu")]
        (DeviceSpec::Wgpu(i), false) => Ok(task.run::<Autodiff<WgpuBackend>>(wgpu_device(i))),
        #[cfg(feature = "wgpu")]
        (DeviceSpec::Wgpu(i), true) => Ok(task.run::<Autodiff<WgpuBackend, Ck>>(wgpu_device(i))),
        #[cfg(feature = "cuda")]
        (DeviceSpec::Cuda(i), false) => {
            Ok(task.run::<Autodiff<burn::backend::Cuda>>(burn::backend::cuda::CudaDevice::new(i)))
        }
        #[cfg(feature = "cuda")]
        (DeviceSpec::Cuda(i), true) => {
            Ok(task
                .run::<Autodiff<burn::backend::Cuda, Ck>>(burn::backend::cuda::CudaDevice::new(i)))
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

#[cfg(feature = "wgpu")]
fn wgpu_device(i: Option<usize>) -> burn::backend::wgpu::WgpuDevice {
    match i {
        None => burn::backend::wgpu::WgpuDevice::DefaultDevice,
        Some(i) => burn::backend::wgpu::WgpuDevice::DiscreteGpu(i),
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
