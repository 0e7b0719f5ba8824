//! The device through the CUDA driver API: one context, one stream, raw device pointers,
//! kernel launches with their arguments, and errors that say which call failed.
//!
//! Raw pointers (not cudarc's tracked slices) keep every launch free of event bookkeeping,
//! so a run can be captured into a CUDA graph.

use crate::{Error, Result};
use cudarc::driver::result::DriverError;
use cudarc::driver::sys;
use std::ffi::c_void;

/// A driver error as the crate's error, naming what was being done.
pub fn drv(what: &str, e: DriverError) -> Error {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Error::backend("cuda", format!("{what}: {name} ({text})"))
}

fn check(what: &str, r: sys::CUresult) -> Result<()> {
    r.result().map_err(|e| drv(what, e))
}

/// The libraries the backend loads, with the file names each is searched under.
pub fn missing_libraries() -> Vec<String> {
    // SAFETY: these only try to open the shared libraries; nothing is called through them.
    let present = unsafe {
        [
            ("cuda", cudarc::driver::sys::is_culib_present()),
            ("nvrtc", cudarc::nvrtc::sys::is_culib_present()),
            ("cublas", cudarc::cublas::sys::is_culib_present()),
            ("cublasLt", cudarc::cublaslt::sys::is_culib_present()),
        ]
    };
    present
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(name, _)| {
            let mut seen = Vec::new();
            for c in cudarc::get_lib_name_candidates(name) {
                if !seen.contains(&c) {
                    seen.push(c);
                }
            }
            // The plain name and the CUDA 13 one; the rest are older versions and other spellings.
            let shown: Vec<&str> = seen
                .iter()
                .map(|s| s.as_str())
                .enumerate()
                .filter(|(i, s)| *i == 0 || s.ends_with(".so.13"))
                .map(|(_, s)| s)
                .collect();
            format!(
                "{name} (tried {} and {} other names)",
                shown.join(", "),
                seen.len().saturating_sub(shown.len())
            )
        })
        .collect()
}

pub struct Gpu {
    pub dev: sys::CUdevice,
    pub ctx: sys::CUcontext,
    pub stream: sys::CUstream,
    pub name: String,
    /// Compute capability (major, minor).
    pub cc: (i32, i32),
    pub total_mem: u64,
    pub sms: i32,
    /// Largest dynamic shared memory a block may opt into.
    pub smem_optin: i32,
    pub driver_version: i32,
    /// Launch kernels with programmatic stream serialization (Hopper's programmatic
    /// dependent launch): a kernel's blocks may be scheduled while the kernel before it in
    /// the stream finishes, and wait in `grid_dep_wait()` (cuda/common.cuh), which every
    /// kernel calls before it touches memory, until that kernel's writes are visible.
    pub pdl: bool,
}

impl Gpu {
    /// Opens device `ordinal`. The caller has checked that the driver library loads.
    pub fn open(ordinal: i32) -> Result<Gpu> {
        cudarc::driver::result::init()
            .map_err(|e| drv("cuInit (is an NVIDIA driver installed and a GPU visible?)", e))?;
        let count = cudarc::driver::result::device::get_count().map_err(|e| drv("cuDeviceGetCount", e))?;
        if count <= ordinal {
            return Err(Error::backend(
                "cuda",
                format!("no CUDA device {ordinal}: the driver sees {count} device(s)"),
            ));
        }
        let dev = cudarc::driver::result::device::get(ordinal).map_err(|e| drv("cuDeviceGet", e))?;
        // SAFETY: `dev` came from cuDeviceGet; the context is released in Drop.
        let ctx = unsafe { cudarc::driver::result::primary_ctx::retain(dev) }
            .map_err(|e| drv("cuDevicePrimaryCtxRetain", e))?;
        // SAFETY: a retained primary context.
        unsafe { cudarc::driver::result::ctx::set_current(ctx) }.map_err(|e| drv("cuCtxSetCurrent", e))?;
        let stream = cudarc::driver::result::stream::create(cudarc::driver::result::stream::StreamKind::NonBlocking)
            .map_err(|e| drv("cuStreamCreate", e))?;
        let attr = |a: sys::CUdevice_attribute| -> Result<i32> {
            // SAFETY: a valid device and attribute.
            unsafe { cudarc::driver::result::device::get_attribute(dev, a) }.map_err(|e| drv("cuDeviceGetAttribute", e))
        };
        use sys::CUdevice_attribute::*;
        let cc = (
            attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let sms = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let smem_optin = attr(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let name = cudarc::driver::result::device::get_name(dev).map_err(|e| drv("cuDeviceGetName", e))?;
        // SAFETY: a valid device.
        let total_mem =
            unsafe { cudarc::driver::result::device::total_mem(dev) }.map_err(|e| drv("cuDeviceTotalMem", e))? as u64;
        let mut driver_version = 0;
        // SAFETY: writes one int.
        check("cuDriverGetVersion", unsafe {
            sys::cuDriverGetVersion(&mut driver_version)
        })?;
        Ok(Gpu {
            dev,
            ctx,
            stream,
            name,
            cc,
            total_mem,
            sms,
            smem_optin,
            driver_version,
            pdl: false,
        })
    }

    /// Makes the context current on the calling thread (the backend may move threads).
    pub fn bind(&self) -> Result<()> {
        // SAFETY: the context lives as long as self.
        unsafe { cudarc::driver::result::ctx::set_current(self.ctx) }.map_err(|e| drv("cuCtxSetCurrent", e))
    }

    pub fn alloc(&self, bytes: u64) -> Result<u64> {
        let mut p: sys::CUdeviceptr = 0;
        // SAFETY: plain device memory (never managed memory); freed in Drop of the owner.
        let r = unsafe { sys::cuMemAlloc_v2(&mut p, bytes.max(1) as usize) };
        r.result().map_err(|e| {
            drv(
                &format!(
                    "cannot allocate {bytes} bytes of device memory on {} ({} bytes in total)",
                    self.name, self.total_mem
                ),
                e,
            )
        })?;
        Ok(p)
    }

    /// # Safety
    /// `p` came from `alloc` and no queued work uses it.
    pub unsafe fn free(&self, p: u64) {
        let _ = sys::cuMemFree_v2(p);
    }

    pub fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: dst..dst+len lies in an allocation (the caller checked the range); a pageable
        // source is staged by the driver before this returns.
        check("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst, src.as_ptr() as *const c_void, src.len(), self.stream)
        })
    }

    /// Queues a copy to the host; valid after `sync`.
    ///
    /// # Safety
    /// `dst` must stay alive and untouched until the next `sync`.
    pub unsafe fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        check(
            "cuMemcpyDtoHAsync",
            sys::cuMemcpyDtoHAsync_v2(dst.as_mut_ptr() as *mut c_void, src, dst.len(), self.stream),
        )
    }

    pub fn memset32(&self, dst: u64, value: u32, words: usize) -> Result<()> {
        if words == 0 {
            return Ok(());
        }
        // SAFETY: the caller passes a range inside an allocation.
        check("cuMemsetD32Async", unsafe {
            sys::cuMemsetD32Async(dst, value, words, self.stream)
        })
    }

    pub fn memset8(&self, dst: u64, value: u8, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: as memset32.
        check("cuMemsetD8Async", unsafe {
            sys::cuMemsetD8Async(dst, value, bytes, self.stream)
        })
    }

    /// Waits for all queued work. An error here comes from an earlier asynchronous launch.
    pub fn sync(&self) -> Result<()> {
        // SAFETY: a valid stream.
        unsafe { cudarc::driver::result::stream::synchronize(self.stream) }.map_err(|e| {
            drv(
                "a queued kernel or copy failed (run with FERROTUNE_CUDA_SYNC=1 to find the kernel)",
                e,
            )
        })
    }

    pub fn launch(
        &self,
        k: &Kernel,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &Args,
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let mut ptrs = args.pointers();
        let r = if self.pdl {
            // SAFETY: a plain-old-data union; the one field set is the one the id names.
            let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attr.value.programmaticStreamSerializationAllowed = 1;
            let config = sys::CUlaunchConfig {
                gridDimX: grid.0,
                gridDimY: grid.1,
                gridDimZ: grid.2,
                blockDimX: block.0,
                blockDimY: block.1,
                blockDimZ: block.2,
                sharedMemBytes: smem,
                hStream: self.stream,
                attrs: &mut attr,
                numAttrs: 1,
            };
            // SAFETY: as below; `attr` outlives the call.
            unsafe { sys::cuLaunchKernelEx(&config, k.f, ptrs.as_mut_ptr(), std::ptr::null_mut()) }
        } else {
            // SAFETY: the argument list matches the kernel's parameters (each kernel's caller
            // builds it from the .cu signature); the pointers outlive this call, and the driver
            // copies the values at launch.
            unsafe {
                sys::cuLaunchKernel(
                    k.f,
                    grid.0,
                    grid.1,
                    grid.2,
                    block.0,
                    block.1,
                    block.2,
                    smem,
                    self.stream,
                    ptrs.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            }
        };
        r.result().map_err(|e| {
            drv(
                &format!(
                    "launching kernel {} (grid {grid:?}, block {block:?}, {smem} B shared)",
                    k.name
                ),
                e,
            )
        })
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // SAFETY: handles created in `open`, used by nothing after this.
        unsafe {
            let _ = cudarc::driver::result::ctx::set_current(self.ctx);
            let _ = cudarc::driver::result::stream::synchronize(self.stream);
            let _ = cudarc::driver::result::stream::destroy(self.stream);
            let _ = cudarc::driver::result::primary_ctx::release(self.dev);
        }
    }
}

/// A loaded kernel and its name (for messages).
#[derive(Clone, Copy)]
pub struct Kernel {
    pub name: &'static str,
    pub f: sys::CUfunction,
}

/// Kernel arguments in launch order. Scalars sit in 8-byte slots (the driver reads as many
/// bytes as the parameter has); structs passed by value are copied into their own slots.
#[derive(Default)]
pub struct Args {
    slots: Vec<Box<[u64]>>,
}

impl Args {
    pub fn new() -> Self {
        Args {
            slots: Vec::with_capacity(16),
        }
    }
    fn word(mut self, w: u64) -> Self {
        self.slots.push(Box::new([w]));
        self
    }
    pub fn ptr(self, p: u64) -> Self {
        self.word(p)
    }
    pub fn i32(self, v: i32) -> Self {
        self.word(v as u32 as u64)
    }
    pub fn u32(self, v: u32) -> Self {
        self.word(v as u64)
    }
    pub fn i64(self, v: i64) -> Self {
        self.word(v as u64)
    }
    pub fn f32(self, v: f32) -> Self {
        self.word(v.to_bits() as u64)
    }
    pub fn f64(self, v: f64) -> Self {
        self.word(v.to_bits())
    }
    /// A `#[repr(C)]` struct passed by value.
    pub fn blob<T: bytemuck::Pod>(mut self, v: &T) -> Self {
        let bytes = bytemuck::bytes_of(v);
        let mut b = vec![0u64; bytes.len().div_ceil(8)].into_boxed_slice();
        bytemuck::cast_slice_mut::<u64, u8>(&mut b)[..bytes.len()].copy_from_slice(bytes);
        self.slots.push(b);
        self
    }
    fn pointers(&self) -> Vec<*mut c_void> {
        self.slots.iter().map(|s| s.as_ptr() as *mut c_void).collect()
    }
}
