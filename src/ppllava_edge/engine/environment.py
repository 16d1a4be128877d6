"""One description of the machine, for `ppllava-edge env`, engines.json and benchmark reports.

    env = collect_environment()      # plain dict, JSON-serializable
    print(format_environment(env))   # the text block `ppllava-edge env` prints

Nothing here fails: a tool or library that is missing is reported as such ("not installed", "none"). A CUDA
major-version mismatch between TensorRT, cuda-python, onnxruntime-gpu and the driver is reported in `cuda_stack.problems` (the
`env` command then exits 1 with an error after printing everything).
"""

from __future__ import annotations

import importlib
import os
import platform
import re
import sys
from pathlib import Path

from .. import __version__
from .availability import cuda_python_version, cuda_stack, tensorrt_version
from .jetson import SOC_SM, Runner, detect_jetson, device_tree, read_meminfo, run_command
from .metadata import normalize_gpu_name, sm_of

NVIDIA_SMI_QUERY = ["nvidia-smi", "--query-gpu=name,driver_version,compute_cap,memory.total", "--format=csv,noheader,nounits"]


def cpu_model(root: Path = Path("/")) -> str:
    try:
        text = (root / "proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Model", "Hardware", "cpu model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", text, flags=re.M)
        if m:
            return m.group(1).strip()
    return platform.processor() or platform.machine()


# /proc/cpuinfo flags of the CPU units ONNX Runtime's int8 / bf16 kernels can use (x86; ARM's are asimddp / i8mm / bf16)
CPU_UNITS = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
             "asimddp", "i8mm", "bf16")


def cpu_units(root: Path = Path("/")) -> list[str]:
    """The int8 / bf16 units of CPU_UNITS the first processor of /proc/cpuinfo lists (`flags` on x86, `Features`
    on ARM), in CPU_UNITS order; [] when unreadable."""
    try:
        text = (root / "proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return []
    m = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, flags=re.M)
    flags = set(m.group(1).split()) if m else set()
    return [u for u in CPU_UNITS if u in flags]


def cpu_cores() -> dict:
    try:
        import psutil

        return {"logical": psutil.cpu_count(logical=True), "physical": psutil.cpu_count(logical=False)}
    except ImportError:
        return {"logical": os.cpu_count(), "physical": None}


def memory(root: Path = Path("/")) -> dict:
    info = read_meminfo(root)
    if info and info.get("total_bytes"):
        return {"total_bytes": info["total_bytes"], "available_bytes": info["available_bytes"]}
    try:
        import psutil

        vm = psutil.virtual_memory()
        return {"total_bytes": int(vm.total), "available_bytes": int(vm.available)}
    except ImportError:
        return {"total_bytes": None, "available_bytes": None}


def parse_nvidia_smi(query_out: str | None, header_out: str | None) -> dict:
    """GPUs from `nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total` and the CUDA version in its header.
    Names as cudart spells them ('Orin (nvgpu)' -> 'Orin'); a compute capability or memory of '[N/A]' is None."""
    gpus = []
    for line in (query_out or "").strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4:
            mem = int(float(parts[3])) * (1 << 20) if re.match(r"^[\d.]+$", parts[3]) else None
            cc = parts[2] if re.match(r"^\d+\.\d+$", parts[2]) else None  # "[N/A]" on some Jetsons
            gpus.append({"name": normalize_gpu_name(parts[0]), "driver": parts[1], "compute_capability": cc, "memory_bytes": mem})
    m = re.search(r"CUDA Version:\s*([\d.]+)", header_out or "")
    return {"gpus": gpus, "driver": gpus[0]["driver"] if gpus else None, "cuda_driver": m.group(1) if m else None}


def gpu_info(run: Runner) -> dict:
    """GPUs via nvidia-smi, with device 0's name and compute capability from cudart when cuda-python is installed;
    source says where it came from."""
    q = run(NVIDIA_SMI_QUERY)
    smi = parse_nvidia_smi(q, run(["nvidia-smi"]) if q is not None else None)
    info = {"gpus": smi["gpus"], "driver": smi["driver"], "cuda_driver": smi["cuda_driver"], "cuda_runtime": None,
            "source": "nvidia-smi" if q is not None else "nvidia-smi not found"}
    if cuda_python_version():
        try:
            from ..device import device_count, device_info

            n = device_count()
            if n:
                dev = device_info(0)
                info["cuda_driver"] = info["cuda_driver"] or dev["cuda_driver"]
                info["cuda_runtime"] = dev["cuda_runtime"]
                # cudart names the GPU as `build` records it in engines.json: the one source of truth for name and SM
                first = info["gpus"][0] if info["gpus"] else {"driver": None}
                info["gpus"] = [{**first, "name": dev["name"], "compute_capability": dev["compute_capability"],
                                 "memory_bytes": first.get("memory_bytes") or dev["memory_bytes"]}, *info["gpus"][1:]]
                info["source"] = "cuda-python" + (" + nvidia-smi" if first.get("driver") else "")
        except Exception as exc:  # a broken CUDA install is reported, not raised
            info["cuda_error"] = f"{type(exc).__name__}: {exc}"
    return info


def current_gpu(run: Runner | None = None, root: Path | None = None) -> dict:
    """The GPU engines are checked against: {"name", "sm", "module", "source"} (None where unknown).

    One source of truth: cudart (what `build` records in engines.json) when cuda-python sees a device; else
    nvidia-smi with the name as cudart spells it ("Orin (nvgpu)" -> "Orin") and, when it reports the compute
    capability as "[N/A]", the SM of the Jetson SoC (tegra234 -> 87). `module` tells the Jetson modules apart
    (from the device-tree model), as every Orin is "Orin" to CUDA.
    """
    run = run or run_command
    tree = device_tree(root)
    module = tree["module"]
    if cuda_python_version():
        try:
            from ..device import device_count, device_info

            if device_count():
                dev = device_info(0)
                return {"name": dev["name"], "sm": dev["sm"], "module": module, "source": "cudart"}
        except Exception:  # noqa: BLE001 - a broken CUDA install: fall back to nvidia-smi
            pass
    gpus = parse_nvidia_smi(run(NVIDIA_SMI_QUERY), None)["gpus"]
    if not gpus:
        return {"name": None, "sm": None, "module": module, "source": "none (no cuda-python device, nvidia-smi not found)"}
    sm, source = (sm_of(gpus[0]["compute_capability"]), "nvidia-smi") if gpus[0]["compute_capability"] else (None, "nvidia-smi")
    if sm is None and SOC_SM.get(tree["soc"] or ""):
        sm, source = SOC_SM[tree["soc"]], f"nvidia-smi; sm of the Jetson SoC {tree['soc']}"
    return {"name": gpus[0]["name"], "sm": sm, "module": module, "source": source}


def onnxruntime_info() -> dict:
    try:
        import onnxruntime as ort
    except ImportError:
        return {"version": None, "providers": []}
    return {"version": ort.__version__, "providers": list(ort.get_available_providers())}


def git_commit(path: Path, run: Runner) -> dict | None:
    """{"commit", "dirty"} of the git checkout holding `path`, or None when it is not in one."""
    top = run(["git", "-C", str(path), "rev-parse", "--show-toplevel"])
    if not top:
        return None
    commit = run(["git", "-C", str(path), "rev-parse", "HEAD"])
    status = run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"])
    if not commit:
        return None
    return {"commit": commit.strip(), "dirty": bool(status and status.strip())}


def _module_version(name: str) -> str | None:
    try:
        return str(importlib.import_module(name).__version__)
    except Exception:
        return None


def collect_environment(root: str | Path | None = None, run: Runner | None = None) -> dict:
    """The machine, its accelerator stack and this package, as a JSON-serializable dict."""
    from . import jetson

    root = Path(root if root is not None else jetson.ROOT)
    run = run or run_command
    package_dir = Path(__file__).resolve().parents[1]
    gpu = gpu_info(run)
    return {
        "ppllava_edge": {"version": __version__, "path": str(package_dir), "git": git_commit(package_dir, run)},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(), "executable": sys.executable},
        "platform": {"system": platform.system(), "release": platform.release(), "machine": platform.machine(), "platform": platform.platform()},
        "cpu": {"model": cpu_model(root), **cpu_cores(), "units": cpu_units(root)},
        "memory": memory(root),
        "gpu": gpu,
        "tensorrt": tensorrt_version(),
        "cuda_python": cuda_python_version(),
        "cuda_stack": cuda_stack(gpu["cuda_driver"], run),
        "onnxruntime": onnxruntime_info(),
        "numpy": _module_version("numpy"),
        "jetson": detect_jetson(root, run),
    }


def _gib(n: int | None) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n else "?"


def format_environment(env: dict) -> str:
    """`key: value` lines (grep-friendly; the Jetson block is indented)."""
    lines = []
    pkg = env["ppllava_edge"]
    git = pkg.get("git")
    lines.append(f"ppllava-edge: {pkg['version']}" + (f" (git {git['commit'][:12]}{', dirty' if git['dirty'] else ''})" if git else " (not a git checkout)"))
    py = env["python"]
    lines.append(f"python: {py['version']} ({py['implementation']}, {py['executable']})")
    lines.append(f"platform: {env['platform']['platform']}")
    cpu = env["cpu"]
    lines.append(f"cpu: {cpu['model']} ({cpu['logical']} logical cores" + (f", {cpu['physical']} physical)" if cpu.get("physical") else ")"))
    lines.append(f"cpu int8/bf16 units: {' '.join(cpu.get('units') or []) or 'none found'}")
    mem = env["memory"]
    lines.append(f"memory: {_gib(mem['total_bytes'])} total, {_gib(mem['available_bytes'])} available")
    gpu = env["gpu"]
    if gpu["gpus"]:
        for i, g in enumerate(gpu["gpus"]):
            lines.append(f"gpu {i}: {g['name']} (sm {g['compute_capability'] or '?'}, {_gib(g['memory_bytes'])})")
    else:
        lines.append(f"gpu: none detected ({gpu['source']})")
    lines.append(f"nvidia driver: {gpu['driver'] or 'n/a'}")
    lines.append(f"CUDA: driver {gpu['cuda_driver'] or 'n/a'}, runtime {gpu['cuda_runtime'] or 'n/a'}")
    lines.append(f"TensorRT: {env['tensorrt'] or 'not installed'}")
    lines.append(f"cuda-python: {env['cuda_python'] or 'not installed'}")
    stack = env["cuda_stack"]
    ort_gpu = stack.get("onnxruntime_gpu")
    ort_cuda = stack.get("onnxruntime_gpu_cuda")
    majors = (f"TensorRT {stack['tensorrt_cuda'] if stack['tensorrt_cuda'] is not None else '?'} ({stack['tensorrt_cuda_source']}), "
              f"cuda-python {stack['cuda_python'] or '-'}, "
              f"onnxruntime-gpu {f'{ort_gpu} (CUDA {ort_cuda if ort_cuda is not None else chr(63)})' if ort_gpu else '-'}, "
              f"driver {stack['driver_cuda'] or '-'}")
    problems = stack["problems"] + stack.get("ort_problems", [])
    lines.append(f"CUDA majors: {majors}: " + ("MISMATCH: " + "; ".join(problems) if problems else "ok"))
    ort = env["onnxruntime"]
    lines.append(f"onnxruntime: {ort['version'] or 'not installed'} (providers: {', '.join(ort['providers']) or 'none'})")
    lines.append(f"numpy: {env['numpy'] or 'not installed'}")
    j = env["jetson"]
    if not j:
        lines.append("jetson: no")
    else:
        lines.append(f"jetson: {j['model'] or 'unknown model'}" + (f" ({j['soc_name']})" if j.get("soc_name") else "")
                     + (f", module {j['module']}" if j.get("module") else ""))
        lines.append(f"  L4T: {j['l4t'] or '?'} (JetPack {j['jetpack'] or '?'}, {j['jetpack_source']})")
        pm = j["power_mode"]
        lines.append(f"  power mode: {pm['name'] or '?'} (id {pm['id'] if pm['id'] is not None else '?'}, {pm['source']})")
        lines.append(f"  jetson_clocks: {j['jetson_clocks']['state']}")
        jm = j.get("memory") or {}
        lines.append(f"  memory: {_gib(jm.get('total_bytes'))} total, {_gib(jm.get('available_bytes'))} available, swap {_gib(jm.get('swap_total_bytes'))}")
    return "\n".join(lines)

