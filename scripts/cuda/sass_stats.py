"""Static instruction counts of a CUDA kernel family's loops, without a GPU.

    python3 scripts/cuda/sass_stats.py flash_attn.cu KERNEL [NAME=VALUE ...]

Compiles cuda/<family> for sm_90 with NVRTC exactly as the backend does (cuda/common.cuh
first, the same options; NAME=VALUE become -D defines), prints ptxas' register and spill
report, disassembles KERNEL with cuobjdump, and lists its loops (backward branches) with the
instructions of each by kind: how much integer and address work each tensor-core instruction
carries; SASS_OUT=FILE also saves the disassembly. NVRTC and cuobjdump come from PyPI's wheels
(nvidia-cuda-nvrtc, nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm, CUDA 13), unpacked into a
folder given by CUDA_WHEELS (default /tmp/cudawheels), e.g.:

    python3 -m pip download --no-deps --only-binary=:all: -d /tmp/cudawheels \
        nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
    (cd /tmp/cudawheels && for w in *.whl; do python3 -m zipfile -e "$w" .; done)
"""
import collections, ctypes, os, re, subprocess, sys, tempfile

WHEELS = os.environ.get("CUDA_WHEELS", "/tmp/cudawheels")
LIB = os.path.join(WHEELS, "nvidia/cu13/lib")
BIN = os.path.join(WHEELS, "nvidia/cu13/bin")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "cuda")


def compile_cubin(family, defines):
    # libnvrtc loads its builtins library by name, so its folder goes on the search path.
    os.environ["LD_LIBRARY_PATH"] = LIB + ":" + os.environ.get("LD_LIBRARY_PATH", "")
    ctypes.CDLL(os.path.join(LIB, "libnvrtc-builtins.so.13.0"))
    nv = ctypes.CDLL(os.path.join(LIB, "libnvrtc.so.13"))
    src = open(os.path.join(ROOT, "common.cuh")).read() + f'\n#line 1 "{family}"\n' + open(os.path.join(ROOT, family)).read()
    opts = ["--gpu-architecture=sm_90", "--std=c++17", "--device-as-default-execution-space", "--ptxas-options=-v"]
    opts += ["-D" + d for d in defines]
    prog = ctypes.c_void_p()
    assert nv.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), family.encode(), 0, None, None) == 0
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = nv.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    nv.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    nv.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        sys.exit(log.value.decode())
    nv.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    cubin = ctypes.create_string_buffer(n.value)
    nv.nvrtcGetCUBIN(prog, cubin)
    return cubin.raw, log.value.decode()


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    family, kernel, defines = sys.argv[1], sys.argv[2], sys.argv[3:]
    cubin, log = compile_cubin(family, defines)
    report = [l for l in log.splitlines() if kernel in l or "registers" in l or "spill" in l]
    print("\n".join(report))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        env = dict(os.environ, PATH=BIN + ":" + os.environ["PATH"])
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", "-fun", kernel, f.name],
                              capture_output=True, text=True, env=env, check=True).stdout
    if os.environ.get("SASS_OUT"):
        open(os.environ["SASS_OUT"], "w").write(sass)
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(3).split(".")[0], m.group(4)))
    print(f"{kernel}: {len(ins)} instructions")
    loops = []
    for addr, op, rest in ins:
        t = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if t and int(t.group(1), 16) < addr:
            loops.append((int(t.group(1), 16), addr))
    for lo, hi in sorted(loops, key=lambda l: l[0] - l[1])[:6]:
        c = collections.Counter(op for a, op, _ in ins if lo <= a <= hi)
        print(f"loop {lo:#x}-{hi:#x}: {sum(c.values())} instructions, HMMA {c['HMMA']}, "
              f"MUFU {c['MUFU']}, LDSM {c['LDSM']}, LDGSTS {c['LDGSTS']}; most: {c.most_common(8)}")


if __name__ == "__main__":
    main()
