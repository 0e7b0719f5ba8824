//! One wgpu device with everything the kernels need to know about it: which optional
//! features it has (f16, subgroups, timestamps, cooperative matrices), its real limits
//! (not wgpu's conservative defaults), and a cache of compiled pipelines.

use crate::error::{Error, Result};

use super::pipelines::PipelineCache;

/// How to pick and open the device.
#[derive(Clone, Debug)]
pub struct WgslOptions {
    /// Graphics APIs to try. `None`: every backend compiled in, or those named by the
    /// `WGPU_BACKEND` environment variable (e.g. `vulkan`).
    pub backends: Option<wgpu::Backends>,
    /// Ask for the discrete GPU over an integrated one.
    pub power_preference: wgpu::PowerPreference,
    /// Choose the adapter whose name contains this text (case-insensitive), as listed by
    /// [`list_adapters`]. Native only; ignored in the browser.
    pub adapter_name: Option<String>,
    /// Build shader modules with naga's bounds checks. `None`: checked when the environment
    /// variable `FERROTUNE_WGSL_CHECKED=1`, else trusted (unchecked) natively. The browser
    /// always checks.
    pub checked: Option<bool>,
    /// Enable wgpu's experimental cooperative-matrix (tensor core) feature when the adapter has it.
    pub cooperative_matrix: bool,
    /// Optional features never to enable even when the adapter has them (e.g.
    /// `SHADER_F16 | SUBGROUP`), to run the fallback kernels of devices without them.
    pub without: wgpu::Features,
}

impl Default for WgslOptions {
    fn default() -> Self {
        WgslOptions {
            backends: None,
            power_preference: wgpu::PowerPreference::HighPerformance,
            adapter_name: None,
            checked: None,
            cooperative_matrix: true,
            without: wgpu::Features::empty(),
        }
    }
}

/// A 16x16x16 f16 x f16 -> f32 cooperative-matrix configuration is what the tensor-core
/// matmul uses; the others are kept for reporting.
pub type CoopConfig = wgpu::CooperativeMatrixProperties;

/// An open device and what it can do.
pub struct WgslContext {
    pub instance: wgpu::Instance,
    pub adapter: wgpu::Adapter,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    /// Features enabled on `device` (a subset of the adapter's).
    pub features: wgpu::Features,
    /// Limits of `device`: the adapter's own.
    pub limits: wgpu::Limits,
    /// `enable f16;` works (wgpu `SHADER_F16`).
    pub has_f16: bool,
    /// Subgroup builtins work (wgpu `SUBGROUP`).
    pub has_subgroups: bool,
    /// Compute passes can write GPU timestamps (wgpu `TIMESTAMP_QUERY`).
    pub has_timestamps: bool,
    /// Cooperative matrices are enabled and a 16x16x16 f16 -> f32 configuration exists.
    pub has_coop_matrix: bool,
    /// Every cooperative-matrix configuration the adapter reports (empty without the feature).
    pub coop_configs: Vec<CoopConfig>,
    /// Shader modules are created without naga's runtime bounds checks.
    pub trusted: bool,
    pub(crate) pipelines: PipelineCache,
}

impl std::fmt::Debug for WgslContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgslContext")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .field("has_f16", &self.has_f16)
            .field("has_subgroups", &self.has_subgroups)
            .field("has_timestamps", &self.has_timestamps)
            .field("has_coop_matrix", &self.has_coop_matrix)
            .field("trusted", &self.trusted)
            .finish()
    }
}

/// One adapter as `ferrotune devices` prints it.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub info: wgpu::AdapterInfo,
    pub features: wgpu::Features,
    pub max_storage_binding: u64,
    pub max_buffer: u64,
    pub coop_configs: Vec<CoopConfig>,
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = &self.info;
        let has = |feat: wgpu::Features| {
            if self.features.contains(feat) {
                "yes"
            } else {
                "no"
            }
        };
        write!(
            f,
            "{} ({:?}, {:?}, driver {} {}): f16 {}, subgroups {} (size {}..{}), timestamps {}, \
             max storage binding {} MiB, max buffer {} MiB",
            i.name,
            i.backend,
            i.device_type,
            i.driver,
            i.driver_info,
            has(wgpu::Features::SHADER_F16),
            has(wgpu::Features::SUBGROUP),
            i.subgroup_min_size,
            i.subgroup_max_size,
            has(wgpu::Features::TIMESTAMP_QUERY),
            self.max_storage_binding >> 20,
            self.max_buffer >> 20,
        )?;
        if !self.coop_configs.is_empty() {
            write!(f, ", cooperative matrices:")?;
            for c in &self.coop_configs {
                write!(
                    f,
                    " {}x{}x{} {:?}->{:?}",
                    c.m_size, c.n_size, c.k_size, c.ab_type, c.cr_type
                )?;
            }
        }
        Ok(())
    }
}

fn instance_for(backends: Option<wgpu::Backends>) -> (wgpu::Instance, wgpu::Backends) {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if let Some(b) = backends {
        desc.backends = b;
    }
    let tried = desc.backends & wgpu::Instance::enabled_backend_features();
    (wgpu::Instance::new(desc), tried)
}

fn backend_names(b: wgpu::Backends) -> String {
    let all = [
        (wgpu::Backends::VULKAN, "vulkan"),
        (wgpu::Backends::METAL, "metal"),
        (wgpu::Backends::DX12, "dx12"),
        (wgpu::Backends::GL, "gl"),
        (wgpu::Backends::BROWSER_WEBGPU, "webgpu"),
    ];
    let names: Vec<&str> = all.iter().filter(|(f, _)| b.contains(*f)).map(|(_, n)| *n).collect();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

fn no_adapter(tried: wgpu::Backends, why: &str) -> Error {
    Error::backend(
        "wgsl",
        format!(
            "no GPU adapter found (backends tried: {}; {why}). Install a GPU driver with Vulkan \
             (or Metal/DX12) support, or on Linux `apt-get install mesa-vulkan-drivers` for a CPU \
             Vulkan device (lavapipe); WGPU_BACKEND=vulkan selects the backend",
            backend_names(tried)
        ),
    )
}

fn summarize(adapter: &wgpu::Adapter) -> AdapterSummary {
    let limits = adapter.limits();
    let features = adapter.features();
    AdapterSummary {
        info: adapter.get_info(),
        features,
        max_storage_binding: limits.max_storage_buffer_binding_size,
        max_buffer: limits.max_buffer_size,
        coop_configs: if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
            adapter.cooperative_matrix_properties()
        } else {
            Vec::new()
        },
    }
}

/// Every adapter wgpu can see, for `ferrotune devices`.
pub async fn list_adapters(backends: Option<wgpu::Backends>) -> Vec<AdapterSummary> {
    let (instance, tried) = instance_for(backends);
    let adapters = instance.enumerate_adapters(tried).await;
    adapters.iter().map(summarize).collect()
}

/// [`list_adapters`], waiting on the calling thread.
#[cfg(not(target_arch = "wasm32"))]
pub fn list_adapters_blocking(backends: Option<wgpu::Backends>) -> Vec<AdapterSummary> {
    pollster::block_on(list_adapters(backends))
}

/// Whether the environment asks for checked shader modules.
fn checked_from_env() -> bool {
    #[cfg(not(target_arch = "wasm32"))]
    {
        std::env::var("FERROTUNE_WGSL_CHECKED").is_ok_and(|v| v == "1" || v == "true")
    }
    #[cfg(target_arch = "wasm32")]
    {
        true
    }
}

/// Does this configuration list offer the tensor-core matmul's shape (16x16x16, f16 in, f32 out)?
pub fn has_f16_f32_16x16(configs: &[CoopConfig]) -> bool {
    configs.iter().any(|c| {
        c.m_size == 16
            && c.n_size == 16
            && c.k_size == 16
            && c.ab_type == wgpu::CooperativeScalarType::F16
            && c.cr_type == wgpu::CooperativeScalarType::F32
    })
}

impl WgslContext {
    /// Open the best adapter (or the one named in `opts`), with its own limits and every
    /// optional feature our kernels can use.
    pub async fn new(opts: WgslOptions) -> Result<Self> {
        let (instance, tried) = instance_for(opts.backends);
        let adapter = match &opts.adapter_name {
            Some(name) if !cfg!(target_arch = "wasm32") => {
                let want = name.to_lowercase();
                let all = instance.enumerate_adapters(tried).await;
                let names: Vec<String> = all.iter().map(|a| a.get_info().name).collect();
                all.into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&want))
                    .ok_or_else(|| {
                        Error::backend(
                            "wgsl",
                            format!(
                                "no adapter named like {name:?}; available: {names:?} \
                                 (see `ferrotune devices`)"
                            ),
                        )
                    })?
            }
            _ => instance
                .request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: opts.power_preference,
                    force_fallback_adapter: false,
                    compatible_surface: None,
                    ..Default::default()
                })
                .await
                .map_err(|e| no_adapter(tried, &e.to_string()))?,
        };
        let info = adapter.get_info();
        let avail = adapter.features();
        let mut wanted = wgpu::Features::SHADER_F16
            | wgpu::Features::SUBGROUP
            | wgpu::Features::TIMESTAMP_QUERY
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        let coop_configs = if opts.cooperative_matrix && avail.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
        {
            wanted |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
            adapter.cooperative_matrix_properties()
        } else {
            Vec::new()
        };
        let features = avail & wanted & !opts.without;
        let experimental = if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
            // SAFETY: the only experimental feature requested is cooperative matrices; our
            // shaders use them in uniform control flow with configurations the adapter reports.
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("ferrotune"),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features: experimental,
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| {
                Error::backend(
                    "wgsl",
                    format!("could not open a device on adapter {:?}: {e}", info.name),
                )
            })?;
        let has_f16 = features.contains(wgpu::Features::SHADER_F16);
        let coop_enabled = features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
        let checked = cfg!(target_arch = "wasm32") || opts.checked.unwrap_or_else(checked_from_env);
        Ok(WgslContext {
            has_f16,
            has_subgroups: features.contains(wgpu::Features::SUBGROUP),
            has_timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            has_coop_matrix: coop_enabled && has_f16 && has_f16_f32_16x16(&coop_configs),
            coop_configs,
            trusted: !checked,
            features,
            limits,
            info,
            instance,
            adapter,
            device,
            queue,
            pipelines: PipelineCache::default(),
        })
    }

    /// [`WgslContext::new`], waiting on the calling thread.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new_blocking(opts: WgslOptions) -> Result<Self> {
        pollster::block_on(Self::new(opts))
    }

    /// The largest byte range one storage binding may cover on this device.
    pub fn max_storage_binding(&self) -> u64 {
        // WebGPU requires binding sizes that are multiples of 4; keep 16 for vec4 arrays.
        self.limits.max_storage_buffer_binding_size & !15
    }

    /// A one-line description of the device, for logs and benchmark tables.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}, {} {}){}{}{}",
            self.info.name,
            self.info.backend,
            self.info.device_type,
            self.info.driver,
            self.info.driver_info,
            if self.has_f16 { ", f16" } else { "" },
            if self.has_coop_matrix { ", coop-matrix" } else { "" },
            if self.trusted {
                ", trusted shaders"
            } else {
                ", checked shaders"
            },
        )
    }

    /// Wait for all submitted work (natively; a no-op in the browser).
    pub fn wait_idle(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::backend("wgsl", format!("waiting for the GPU failed: {e}")))
    }
}
