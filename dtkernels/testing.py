"""Test helpers shared by the test suite, the demo and the GPU check: one dtype-keyed
tolerance table behind one assert, random inputs (never zeros), output poisoning."""
from __future__ import annotations

import contextlib

import torch

# (rtol, atol) per dtype, for results that round once in the output dtype.
TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def assert_close(actual, expected, *, dtype=None, msg: str = "", **kw) -> None:
    """torch.testing.assert_close with the table's tolerance; NaNs must match."""
    dtype = dtype or expected.dtype
    rtol, atol = TOLERANCES.get(dtype, (0.0, 0.0))
    kw.setdefault("rtol", rtol)
    kw.setdefault("atol", atol)
    kw.setdefault("equal_nan", True)
    torch.testing.assert_close(actual, expected.to(actual.dtype) if expected.dtype != actual.dtype else expected,
                               msg=(lambda m: f"{msg}\n{m}") if msg else None, **kw)


def rand(*shape, dtype=torch.float32, device="cpu", memory_format=None, requires_grad=False,
         generator=None) -> torch.Tensor:
    """Standard-normal data (never zeros), optionally channels_last."""
    t = torch.randn(*shape, dtype=torch.float32, device="cpu", generator=generator).to(dtype=dtype, device=device)
    if memory_format is not None:
        t = t.contiguous(memory_format=memory_format)
    return t.requires_grad_(requires_grad)


def poison_outputs(on: bool = True):
    """Context manager: kernels fill their outputs with NaN (-77 for integers)
    before writing, so an element a kernel forgets to write shows."""
    from . import _C

    @contextlib.contextmanager
    def cm():
        prev = _C._poison()
        _C._set_poison(on)
        try:
            yield
        finally:
            _C._set_poison(prev)

    return cm()


def compile_triton(kernel, signature: dict, constexprs: dict, *, arch: int = 90, num_warps: int = 4,
                   aligned=True):
    """Compile a @triton.jit kernel (autotuned or not) to a cubin for sm_<arch>, with
    no GPU present. Catches type and lowering errors that the interpreter, which
    runs the kernel as NumPy, lets through. `signature` maps each runtime argument
    to a Triton type ("*fp16", "i32", "fp32", ...). With `aligned` True, pointers and
    integers are taken as multiples of 16, as real launches specialise them when
    they are; compile once without it too to cover the unaligned specialisation.
    `aligned` may also name the arguments that are (a launch's own specialisation)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn  # Autotuner / Heuristics wrap the JITFunction
    sig = {name: ("constexpr" if name in constexprs else signature[name]) for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if (aligned is True or (aligned and name in aligned))
             and (sig[name].startswith("*") or sig[name] in ("i32", "i64"))}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def cubin_facts(compiled) -> dict:
    """What ptxas made of a compile_triton result, read with the cuobjdump that
    Triton ships: registers and stack per thread, the SASS instruction count, and
    the count of each opcode (e.g. "CALL": calls to software routines such as
    64-bit integer division; "LDG": global loads)."""
    import os
    import re
    import subprocess
    import tempfile
    from collections import Counter

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    # instruction lines: /*0040*/  [@P0] OPCODE.MODIFIERS operands ;
    ops = [m.group(1).split(".")[0] for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", sass)]
    return {"registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
            "instructions": len(ops), "opcodes": Counter(ops)}


class TritonLaunch:
    """One launch a fake_cuda_driver recorded: the kernel, its compile (metadata:
    options, constants, specialisation hash), the grid and the runtime arguments as
    the kernel sees them. Tensors are kept as dtype, layout and 16-byte alignment
    (what Triton specialises on), not as tensors: a record holds no memory, and
    launches on fresh allocations compare."""

    def __init__(self, name, metadata, grid, args):
        self.name = name
        self.metadata = metadata
        self.grid = grid
        self.args = [("tensor", a.dtype, tuple(a.shape), a.stride(), a.data_ptr() % 16 == 0)
                     if isinstance(a, torch.Tensor) else a for a in args]

    def same_as(self, other: "TritonLaunch") -> bool:
        return (self.name == other.name and self.metadata == other.metadata and self.grid == other.grid
                and self.args == other.args)


# Module-wide, since the JIT caches keep each kernel, its launcher and its handles
# from one use of fake_cuda_driver to the next: the kernels by the function handle
# each got (the launcher sees the handle, not the kernel), and the list that the
# context now open records into.
_FAKE_KERNELS: dict[int, tuple] = {}
_FAKE_LAUNCHES: list = [None]


@contextlib.contextmanager
def fake_cuda_driver(arch: int = 90, bench_ms=None, record: bool = True):
    """Context manager: Triton launches run its real host path (argument binding,
    specialisation, the JIT cache, the autotuner, compilation for sm_<arch>) and
    stop where the launcher would hand the kernel to the driver; the launch is
    recorded instead (yields the list of TritonLaunch; with record=False, which
    timings want, nothing is kept and the list stays empty). Measures and tests the
    host side of the Triton backend with no GPU. The autotuner "benchmarks" each config
    by `bench_ms(config_kwargs)` (default: all equal, so it keeps the first).

    CPU-only processes: the kernels it compiles stay in the JIT functions' caches
    for device 0 with fake handles, so it refuses to run where CUDA is available."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    if torch.cuda.is_available():
        raise RuntimeError("fake_cuda_driver: a CUDA device is present; real launches would find its fake kernels")
    launches: list[TritonLaunch] = []

    kernels = _FAKE_KERNELS
    made = [None]

    class Launcher:
        def __init__(self, src, metadata):  # _init_handles makes the launcher, then loads
            made[0] = metadata

        def __call__(self, g0, g1, g2, stream, function, packed_metadata, launch_metadata, enter, exit_, *args):
            if _FAKE_LAUNCHES[0] is None:
                raise RuntimeError("a kernel compiled under fake_cuda_driver was launched outside it")
            if _FAKE_LAUNCHES[0] is not False:
                _FAKE_LAUNCHES[0].append(TritonLaunch(*kernels[function], (g0, g1, g2), args))

    class Utils:
        def load_binary(self, name, kernel, shared, device):
            handle = len(kernels) + 1
            kernels[handle] = (name, made[0])
            return 1, handle, 0, 0, 1024  # module, function, registers, spills, max threads

        def get_device_properties(self, device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    class Driver:
        utils = Utils()
        launcher_cls = Launcher

        def is_active(self):
            return True

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    # The autotuner "benchmarks" a config by running it once (its compile and one
    # recorded launch) and taking bench_ms's time for it.
    orig_bench = triton.runtime.autotuner.Autotuner._bench

    def _bench(self, *args, config, **meta):
        self.fn.run(*args, **meta, **config.all_kwargs())
        ms = bench_ms(config.all_kwargs()) if bench_ms else 1.0
        return [ms, ms, ms]

    prev = driver._active
    _FAKE_LAUNCHES[0] = launches if record else False
    triton.runtime.autotuner.Autotuner._bench = _bench
    driver.set_active(Driver())
    try:
        yield launches
    finally:
        driver.set_active(prev)  # None: Triton finds the real driver on next use
        _FAKE_LAUNCHES[0] = None  # a fake kernel launched outside the context fails
        triton.runtime.autotuner.Autotuner._bench = orig_bench


def saved_tensor_bytes(fn, exclude=()):
    """Runs fn() and counts what autograd saves for backward meanwhile, through
    torch.autograd.graph.saved_tensors_hooks: the bytes of the distinct storages
    (a tensor saved by several nodes, or views of one buffer, count once; a view
    counts its whole storage, which is what stays alive), leaving out storages of
    `exclude` (parameters and buffers, which exist anyway). Returns (bytes,
    {storage data_ptr: bytes}, fn's result)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.nbytes() and st.data_ptr() not in skip:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(storages.values()), storages, result


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that reaches the dispatcher below autograd, as (name, args,
    kwargs) in ``calls``, e.g. ("dtkernels.max_pool2d.default", ...). The
    dispatcher leaves out trailing arguments equal to their defaults."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func), args, kwargs or {}))
        return func(*args, **(kwargs or {}))
