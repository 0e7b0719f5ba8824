//! Kernel sources (cuda/*.cu, one file per family), their NVRTC compilation for the device's
//! architecture, and the loaded modules.
//!
//! Each family is compiled once per process for a given architecture and option set (a
//! process-wide cache keyed by source and options), straight to machine code (cubin), so
//! loading needs no PTX JIT.

use super::gpu::{drv, Kernel};
use crate::{Error, Result};
use cudarc::driver::sys;
use cudarc::nvrtc::sys as nv;
use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::sync::{Mutex, OnceLock};

const COMMON: &str = include_str!("../../../cuda/common.cuh");

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Elementwise,
    RmsNorm,
    Rope,
    Swiglu,
    CrossEntropy,
    Optim,
    Attention,
    FlashAttn,
    LowRank,
}

impl Family {
    pub const ALL: [Family; 9] = [
        Family::Elementwise,
        Family::RmsNorm,
        Family::Rope,
        Family::Swiglu,
        Family::CrossEntropy,
        Family::Optim,
        Family::Attention,
        Family::FlashAttn,
        Family::LowRank,
    ];

    pub fn file(self) -> &'static str {
        match self {
            Family::Elementwise => "elementwise.cu",
            Family::RmsNorm => "rmsnorm.cu",
            Family::Rope => "rope.cu",
            Family::Swiglu => "swiglu.cu",
            Family::CrossEntropy => "cross_entropy.cu",
            Family::Optim => "optim.cu",
            Family::Attention => "attention.cu",
            Family::FlashAttn => "flash_attn.cu",
            Family::LowRank => "low_rank.cu",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Family::Elementwise => include_str!("../../../cuda/elementwise.cu"),
            Family::RmsNorm => include_str!("../../../cuda/rmsnorm.cu"),
            Family::Rope => include_str!("../../../cuda/rope.cu"),
            Family::Swiglu => include_str!("../../../cuda/swiglu.cu"),
            Family::CrossEntropy => include_str!("../../../cuda/cross_entropy.cu"),
            Family::Optim => include_str!("../../../cuda/optim.cu"),
            Family::Attention => include_str!("../../../cuda/attention.cu"),
            Family::FlashAttn => include_str!("../../../cuda/flash_attn.cu"),
            Family::LowRank => include_str!("../../../cuda/low_rank.cu"),
        }
    }

    /// The lowest compute capability the family's instructions need.
    pub fn min_cc(self) -> (i32, i32) {
        match self {
            // mma.sync bf16, ldmatrix, cp.async
            Family::FlashAttn | Family::LowRank => (8, 0),
            _ => (7, 0),
        }
    }

    /// The text NVRTC compiles: the shared helpers, then the family's file. With
    /// `FERROTUNE_CUDA_SOURCE_DIR` set, a `common.cuh` or family file found in that folder
    /// replaces the built-in one (for trying kernel edits without rebuilding).
    pub fn source(self) -> Result<String> {
        let common = override_text("common.cuh")?.unwrap_or_else(|| COMMON.to_string());
        let body = override_text(self.file())?.unwrap_or_else(|| self.body().to_string());
        Ok(format!("{common}\n#line 1 \"{}\"\n{body}", self.file()))
    }
}

/// The text of `file` in `FERROTUNE_CUDA_SOURCE_DIR`, when that is set and holds it.
fn override_text(file: &str) -> Result<Option<String>> {
    let Some(dir) = std::env::var_os("FERROTUNE_CUDA_SOURCE_DIR") else {
        return Ok(None);
    };
    let path = std::path::Path::new(&dir).join(file);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::backend(
            "cuda",
            format!("reading {} (FERROTUNE_CUDA_SOURCE_DIR): {e}", path.display()),
        )),
    }
}

/// `sm_XY` for a compute capability.
pub fn arch_name(cc: (i32, i32)) -> String {
    format!("sm_{}{}", cc.0, cc.1)
}

fn options(arch: &str, verbose: bool, defines: &[&str]) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--device-as-default-execution-space".to_string(),
    ];
    if verbose {
        o.push("--ptxas-options=-v".to_string());
    }
    o.extend(defines.iter().map(|d| format!("-D{d}")));
    o.extend(extra_defines().iter().map(|d| format!("-D{d}")));
    o
}

/// `FERROTUNE_CUDA_DEFINES`: space-separated `NAME=VALUE` defines added to every kernel
/// compilation (the kernels' tuning switches, for measuring alternatives on a device).
fn extra_defines() -> &'static [String] {
    static DEFS: OnceLock<Vec<String>> = OnceLock::new();
    DEFS.get_or_init(|| {
        std::env::var("FERROTUNE_CUDA_DEFINES")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect()
    })
}

/// A compiled family: machine code and the compiler's log.
#[derive(Clone)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
}

fn nvrtc_check(what: &str, r: nv::nvrtcResult) -> Result<()> {
    r.result()
        .map_err(|e| Error::backend("cuda", format!("NVRTC {what}: {e:?}")))
}

fn program_log(prog: nv::nvrtcProgram) -> String {
    let mut size = 0usize;
    // SAFETY: a live program; the buffer has the size NVRTC reported.
    unsafe {
        if nv::nvrtcGetProgramLogSize(prog, &mut size).result().is_err() || size == 0 {
            return String::new();
        }
        let mut buf = vec![0 as c_char; size];
        if nv::nvrtcGetProgramLog(prog, buf.as_mut_ptr()).result().is_err() {
            return String::new();
        }
        CStr::from_ptr(buf.as_ptr()).to_string_lossy().trim().to_string()
    }
}

/// Compiles one family for `arch` (e.g. `sm_90`) with preprocessor `defines` (`NAME=VALUE`).
/// An error carries the compiler's log.
pub fn compile(family: Family, arch: &str, verbose: bool, defines: &[&str]) -> Result<Compiled> {
    // SAFETY: checking for the library only opens it.
    if !unsafe { nv::is_culib_present() } {
        return Err(Error::backend(
            "cuda",
            format!(
                "NVRTC is not available: none of {:?} could be loaded",
                cudarc::get_lib_name_candidates("nvrtc")
            ),
        ));
    }
    let src = CString::new(family.source()?).map_err(|_| Error::backend("cuda", "kernel source holds a NUL byte"))?;
    let name = CString::new(family.file()).expect("file names have no NUL");
    let opts: Vec<CString> = options(arch, verbose, defines)
        .into_iter()
        .map(|o| CString::new(o).expect("options have no NUL"))
        .collect();
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: nv::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: the strings outlive the program, which is destroyed below on every path.
    unsafe {
        nvrtc_check(
            "nvrtcCreateProgram",
            nv::nvrtcCreateProgram(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            ),
        )?;
        let r = nv::nvrtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr());
        let log = program_log(prog);
        let out = if r.result().is_err() {
            Err(Error::backend(
                "cuda",
                format!(
                    "NVRTC could not compile the {} kernels {defines:?} for {arch} ({r:?}):\n{log}",
                    family.file()
                ),
            ))
        } else {
            let mut size = 0usize;
            nvrtc_check("nvrtcGetCUBINSize", nv::nvrtcGetCUBINSize(prog, &mut size))?;
            let mut cubin = vec![0u8; size];
            nvrtc_check(
                "nvrtcGetCUBIN",
                nv::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char),
            )?;
            Ok(Compiled { cubin, log })
        };
        let _ = nv::nvrtcDestroyProgram(&mut prog);
        out
    }
}

type CacheKey = (Family, String, Vec<String>);

/// `compile` through the process-wide cache (one compilation per family, arch and options).
fn compile_cached(family: Family, arch: &str, defines: &[&str]) -> Result<Compiled> {
    static CACHE: OnceLock<Mutex<HashMap<CacheKey, Compiled>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let key = (
        family,
        arch.to_string(),
        defines.iter().map(|d| d.to_string()).collect(),
    );
    if let Some(c) = cache.lock().expect("kernel cache").get(&key) {
        return Ok(c.clone());
    }
    let c = compile(family, arch, false, defines)?;
    cache.lock().expect("kernel cache").insert(key, c.clone());
    Ok(c)
}

/// Compiles every family for `arch` without a GPU (NVRTC alone) and returns each family's
/// file name and the assembler's resource report (registers, shared memory, spills).
pub fn compile_all_kernels(arch: &str) -> Result<Vec<(String, String)>> {
    Family::ALL
        .iter()
        .map(|&f| compile(f, arch, true, &[]).map(|c| (f.file().to_string(), c.log)))
        .collect()
}

/// Loaded modules and kernel handles of one context.
pub struct Modules {
    arch: String,
    cc: (i32, i32),
    modules: HashMap<(Family, Vec<&'static str>), sys::CUmodule>,
    kernels: HashMap<&'static str, Kernel>,
    /// Dynamic shared memory each kernel was allowed so far.
    smem: HashMap<&'static str, u32>,
}

impl Modules {
    pub fn new(cc: (i32, i32)) -> Self {
        Modules {
            arch: arch_name(cc),
            cc,
            modules: HashMap::new(),
            kernels: HashMap::new(),
            smem: HashMap::new(),
        }
    }

    /// Compiles and loads a family unless it is loaded already.
    pub fn load(&mut self, family: Family) -> Result<sys::CUmodule> {
        self.load_variant(family, &[])
    }

    /// Compiles and loads a family with preprocessor defines (one module per define set).
    pub fn load_variant(&mut self, family: Family, defines: &[&'static str]) -> Result<sys::CUmodule> {
        if let Some(&m) = self.modules.get(&(family, defines.to_vec())) {
            return Ok(m);
        }
        if self.cc < family.min_cc() {
            return Err(Error::backend(
                "cuda",
                format!(
                    "the {} kernels need compute capability {}.{} or newer; this device has {}.{}",
                    family.file(),
                    family.min_cc().0,
                    family.min_cc().1,
                    self.cc.0,
                    self.cc.1
                ),
            ));
        }
        let c = compile_cached(family, &self.arch, defines)?;
        // SAFETY: a cubin NVRTC produced for this device's architecture.
        let m = unsafe { cudarc::driver::result::module::load_data(c.cubin.as_ptr() as *const _) }
            .map_err(|e| drv(&format!("loading the {} module", family.file()), e))?;
        self.modules.insert((family, defines.to_vec()), m);
        Ok(m)
    }

    /// The kernel `name` of `family`, loading the family on first use.
    pub fn get(&mut self, family: Family, name: &'static str) -> Result<Kernel> {
        self.get_variant(family, &[], name)
    }

    /// The kernel `name` of a family compiled with `defines`.
    pub fn get_variant(&mut self, family: Family, defines: &[&'static str], name: &'static str) -> Result<Kernel> {
        if let Some(&k) = self.kernels.get(name) {
            return Ok(k);
        }
        let m = self.load_variant(family, defines)?;
        let cname = CString::new(name).expect("kernel names have no NUL");
        // SAFETY: a loaded module.
        let f = unsafe { cudarc::driver::result::module::get_function(m, cname) }
            .map_err(|e| drv(&format!("finding kernel {name} in {}", family.file()), e))?;
        let k = Kernel { name, f };
        self.kernels.insert(name, k);
        Ok(k)
    }

    /// Like `get_variant`, and lets the kernel use `smem` bytes of dynamic shared memory.
    pub fn get_with_smem(
        &mut self,
        family: Family,
        defines: &[&'static str],
        name: &'static str,
        smem: u32,
    ) -> Result<Kernel> {
        let k = self.get_variant(family, defines, name)?;
        if smem > 48 * 1024 && self.smem.get(name).is_none_or(|&s| s < smem) {
            // SAFETY: a loaded function; the attribute only raises the launch limit.
            unsafe {
                cudarc::driver::result::function::set_function_attribute(
                    k.f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
            }
            .map_err(|e| drv(&format!("allowing {smem} bytes of shared memory for {name}"), e))?;
            self.smem.insert(name, smem);
        }
        Ok(k)
    }
}

impl Drop for Modules {
    fn drop(&mut self) {
        for &m in self.modules.values() {
            // SAFETY: modules loaded by this struct; nothing runs after the backend drops.
            unsafe {
                let _ = cudarc::driver::result::module::unload(m);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Family;

    /// Kernels are launched with programmatic dependent launch (`Gpu::pdl`), which is only
    /// correct when each one waits for the kernels before it before touching memory: every
    /// `__global__` body must begin with `grid_dep_wait();`.
    #[test]
    fn every_kernel_waits_for_the_grids_before_it() {
        let mut kernels = 0;
        for f in Family::ALL {
            let src = f.body();
            for (at, _) in src.match_indices("__global__") {
                let open = at + src[at..].find('{').expect("a kernel body");
                let first = src[open + 1..].trim_start_matches(|c: char| c.is_whitespace() || c == '\\');
                let name_end = src[..open].rfind('(').unwrap_or(open);
                assert!(
                    first.starts_with("grid_dep_wait();"),
                    "{}: the kernel at `{}` does not begin with grid_dep_wait()",
                    f.file(),
                    src[at..name_end].trim()
                );
                kernels += 1;
            }
        }
        assert!(kernels >= 40, "found only {kernels} kernels");
    }
}
